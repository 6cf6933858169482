//! Real-process tests: `tynamo server` hosts on loopback, driven by redis-cli, redis-benchmark
//! and a small synchronous RESP client, through kills, stops, restarts and garbage.
//!
//! Every wait is a poll for a condition with a deadline; no sleep is used to synchronise. The
//! tests share the machine's two CPUs, so they run one at a time (a global lock).
//!
//! Run: `cargo test --test server_cluster -- --nocapture`

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tynamo::resp::frame::{decode, Frame, Limits};

mod common;
use common::{free_base, lock};

const DEADLINE: Duration = Duration::from_secs(30);
/// Poll interval while waiting for a condition (not a synchronisation: the condition decides).
const POLL: Duration = Duration::from_millis(20);

struct Host {
    id: u64,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

struct Cluster {
    dir: tempfile::TempDir,
    hosts: Vec<Host>,
    cores: u16,
    extra: Vec<String>,
    map: String,
}

impl Cluster {
    fn start(hosts: u64, cores: u16, extra: &[&str]) -> Cluster {
        let base = free_base(hosts as u16, cores);
        let hosts_v: Vec<Host> = (0..hosts)
            .map(|h| Host {
                id: h + 1,
                client: base + 10 * h as u16,
                peer: base + 100 + 10 * h as u16,
                child: None,
            })
            .collect();
        let map = hosts_v
            .iter()
            .map(|h| format!("{}=127.0.0.1:{}/127.0.0.1:{}", h.id, h.peer, h.client))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            dir: tempfile::tempdir().unwrap(),
            hosts: hosts_v,
            cores,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            map,
        };
        for i in 0..c.hosts.len() {
            c.spawn(i);
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let h = &self.hosts[i];
        let data = self.dir.path().join(format!("host-{}", h.id));
        let log = std::fs::File::create(self.dir.path().join(format!("host-{}.log", h.id)))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_tynamo"))
            .args(["server", "--id", &h.id.to_string()])
            .arg("--data")
            .arg(&data)
            .args(["--initial-cluster", &self.map])
            .args(["--cores", &self.cores.to_string(), "--placement", "unbound"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tynamo server");
        self.hosts[i].child = Some(child);
    }

    fn signal(&self, i: usize, sig: i32) {
        let pid = self.hosts[i].child.as_ref().expect("running").id();
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
    }

    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.hosts[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn alive(&mut self, i: usize) -> bool {
        match self.hosts[i].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn port(&self, i: usize, core: u16) -> u16 {
        self.hosts[i].client + core
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("host-{}.log", self.hosts[i].id)),
        )
        .unwrap_or_default()
    }

    /// Host i's log, what its process is doing and whether its client ports accept, for a
    /// failure message (a host that never finished starting shows there).
    fn state(&self, i: usize) -> String {
        let process = match self.hosts[i].child.as_ref() {
            Some(c) => common::process_state(c.id()),
            None => "not running".to_string(),
        };
        let ports: Vec<String> = (0..self.cores)
            .map(|c| {
                let port = self.port(i, c);
                format!("{port}: {}", common::accepts(&format!("127.0.0.1:{port}")))
            })
            .collect();
        format!(
            "--- host {}\n{process}\n  client ports accept: {}\n{}",
            self.hosts[i].id,
            ports.join(", "),
            self.log(i)
        )
    }

    /// INFO of host i core g, if it answers.
    fn info(&self, i: usize, core: u16) -> Option<String> {
        let mut c = Resp::connect(self.port(i, core)).ok()?;
        match c.call(&[b"INFO"]).ok()? {
            Frame::Bulk(b) | Frame::Verbatim(b) => Some(String::from_utf8_lossy(&b).into_owned()),
            _ => None,
        }
    }

    /// The host leading group `g` by its own account, once one does (among running hosts).
    fn wait_leader(&mut self, g: u16, except: Option<usize>) -> usize {
        let start = Instant::now();
        loop {
            for i in 0..self.hosts.len() {
                if Some(i) == except || !self.alive(i) {
                    continue;
                }
                if let Some(info) = self.info(i, g) {
                    // A leader serves once its group accepted its first configuration.
                    if info.contains("raft_role:Leader")
                        && info_field(&info, "applied_index") > 0
                        && info_field(&info, "group_config_num") > 0
                    {
                        return i;
                    }
                }
            }
            assert!(
                start.elapsed() < DEADLINE,
                "no leader for group {g} within {DEADLINE:?}; hosts: {}",
                (0..self.hosts.len())
                    .map(|i| self.state(i))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(POLL);
        }
    }

    fn seed_ports(&self) -> Vec<u16> {
        let mut v = Vec::new();
        for i in 0..self.hosts.len() {
            for c in 0..self.cores {
                v.push(self.port(i, c));
            }
        }
        v
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.hosts.len() {
            if let Some(c) = self.hosts[i].child.as_ref() {
                // SAFETY: kill(2) on our own child's pid; SIGCONT first so a stopped one dies.
                unsafe {
                    libc::kill(c.id() as i32, libc::SIGCONT);
                }
            }
            self.kill(i);
        }
    }
}

fn info_field(info: &str, name: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A minimal synchronous RESP client.
struct Resp {
    stream: TcpStream,
    buf: BytesMut,
}

impl Resp {
    fn connect(port: u16) -> std::io::Result<Resp> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_nodelay(true)?;
        Ok(Resp {
            stream,
            buf: BytesMut::new(),
        })
    }

    fn send(&mut self, args: &[&[u8]]) -> std::io::Result<()> {
        let mut out = Vec::new();
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.stream.write_all(&out)
    }

    fn read(&mut self) -> std::io::Result<Frame> {
        loop {
            match decode(&mut self.buf, &Limits::DEFAULT) {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
            let mut chunk = [0u8; 16 << 10];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn call(&mut self, args: &[&[u8]]) -> std::io::Result<Frame> {
        self.send(args)?;
        self.read()
    }
}

/// Sends a command, following MOVED and retrying TRYAGAIN and broken connections until the
/// deadline. Returns the final reply.
fn exec(seeds: &[u16], args: &[&[u8]], deadline: Instant) -> Option<Frame> {
    let mut port = seeds[0];
    let mut seed_at = 0;
    while Instant::now() < deadline {
        let reply = Resp::connect(port).and_then(|mut c| c.call(args));
        match reply {
            Ok(Frame::Error(e)) => {
                let text = String::from_utf8_lossy(&e).into_owned();
                if let Some(rest) = text.strip_prefix("MOVED ") {
                    let addr = rest.split_whitespace().nth(1).unwrap_or("");
                    port = addr
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(port);
                    continue;
                }
                if text.starts_with("TRYAGAIN") || text.starts_with("CLUSTERDOWN") {
                    std::thread::sleep(POLL);
                    continue;
                }
                return Some(Frame::Error(e));
            }
            Ok(f) => return Some(f),
            Err(_) => {
                // A dead or stopped host: try the next seed.
                seed_at = (seed_at + 1) % seeds.len();
                port = seeds[seed_at];
                std::thread::sleep(POLL);
            }
        }
    }
    None
}

fn set_ok(seeds: &[u16], k: &str, v: &str, deadline: Instant) -> bool {
    matches!(exec(seeds, &[b"SET", k.as_bytes(), v.as_bytes()], deadline), Some(Frame::Simple(s)) if &s[..] == b"OK")
}

fn get(seeds: &[u16], k: &str, deadline: Instant) -> Option<Vec<u8>> {
    match exec(seeds, &[b"GET", k.as_bytes()], deadline) {
        Some(Frame::Bulk(b)) => Some(b.to_vec()),
        _ => None,
    }
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-c", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli is installed (redis-tools)");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn redis_cli_and_redis_benchmark_work_against_a_three_host_cluster() {
    let _l = lock();
    let mut c = Cluster::start(3, 2, &[]);
    for g in 0..2 {
        c.wait_leader(g, None);
    }
    // Ask a follower of group 0 so that redis-cli has to follow MOVED.
    let port = c.port(0, 0);
    for (k, v) in [("k", "v"), ("foo", "bar"), ("{user1}.name", "ann")] {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let r = redis_cli(port, &["SET", k, v]);
            if r == "OK" {
                break;
            }
            assert!(Instant::now() < deadline, "SET {k}: {r}");
            std::thread::sleep(POLL);
        }
        assert_eq!(redis_cli(port, &["GET", k]), v);
    }
    assert_eq!(redis_cli(port, &["CLUSTER", "KEYSLOT", "foo"]), "12182");
    assert_eq!(redis_cli(port, &["INCR", "counter"]), "1");
    assert_eq!(redis_cli(port, &["APPEND", "counter", "0"]), "2");
    assert_eq!(redis_cli(port, &["GET", "counter"]), "10");
    assert_eq!(redis_cli(port, &["DEL", "counter"]), "1");
    assert_eq!(redis_cli(port, &["EXISTS", "counter"]), "0");
    assert_eq!(redis_cli(port, &["MSET", "{t}a", "1", "{t}b", "2"]), "OK");
    assert_eq!(redis_cli(port, &["MGET", "{t}a", "{t}b", "{t}c"]), "1\n2"); // nil prints empty
    assert!(redis_cli(port, &["MSET", "a", "1", "b", "2"]).contains("CROSSSLOT"));
    // Several keys of one slot: one reply per command, the sum of the per-key results.
    assert_eq!(
        redis_cli(port, &["EXISTS", "{t}a", "{t}b", "{t}c", "{t}a"]),
        "3"
    );
    assert_eq!(redis_cli(port, &["DEL", "{t}a", "{t}c", "{t}b"]), "2");
    assert_eq!(redis_cli(port, &["EXISTS", "{t}a", "{t}b"]), "0");
    assert!(redis_cli(port, &["DEL", "a", "b"]).contains("CROSSSLOT"));
    assert_eq!(redis_cli(port, &["SET", "nx", "1", "NX"]), "OK");
    assert_eq!(redis_cli(port, &["SET", "nx", "2", "NX"]), "");
    // XX: set only over an existing key (null reply, nothing created, when the key is missing).
    assert_eq!(redis_cli(port, &["SET", "xx", "1", "XX"]), "");
    assert_eq!(redis_cli(port, &["EXISTS", "xx"]), "0");
    assert_eq!(redis_cli(port, &["SET", "nx", "3", "XX"]), "OK");
    assert_eq!(redis_cli(port, &["GET", "nx"]), "3");
    let slots = redis_cli(port, &["CLUSTER", "SLOTS"]);
    assert!(slots.starts_with("0\n8191\n"), "{slots}");
    let nodes = redis_cli(port, &["CLUSTER", "NODES"]);
    assert_eq!(nodes.lines().count(), 6, "{nodes}");
    assert_eq!(
        nodes.matches("master").count(),
        2,
        "one leader per group: {nodes}"
    );
    // INFO <section> answers that section only (case-insensitive); no argument and `all`, all.
    let headers = |args: &[&str]| -> Vec<String> {
        redis_cli(port, args)
            .lines()
            .filter(|l| l.starts_with("# "))
            .map(|l| l.trim_end().to_string())
            .collect()
    };
    assert_eq!(headers(&["INFO", "raft"]), ["# Raft"]);
    assert_eq!(
        headers(&["INFO", "KEYSPACE", "Server"]),
        ["# Server", "# Keyspace"]
    );
    let every = headers(&["INFO"]);
    assert!(every.len() >= 8, "{every:?}");
    assert_eq!(headers(&["INFO", "all"]), every);
    assert!(redis_cli(port, &["INFO", "raft"]).contains("raft_role:"));

    let out = Command::new("redis-benchmark")
        .args([
            "--cluster",
            "-p",
            &port.to_string(),
            "-t",
            "set,get",
            "-n",
            "4000",
        ])
        .args(["-c", "16", "-d", "64", "-q"])
        .output()
        .expect("redis-benchmark is installed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("SET:") && text.contains("GET:"), "{text}");
    println!("redis-benchmark (debug build):\n{text}");
    for i in 0..3 {
        assert!(c.alive(i), "host {} died: {}", i + 1, c.log(i));
    }
}

/// Waits until a writer thread has counted `n` acknowledged writes (fails after DEADLINE).
fn wait_for_acked(acked: &AtomicU64, n: u64) {
    let start = Instant::now();
    while acked.load(Ordering::SeqCst) < n {
        assert!(
            start.elapsed() < DEADLINE,
            "writes stalled at {}",
            acked.load(Ordering::SeqCst)
        );
        std::thread::sleep(POLL);
    }
}

#[test]
fn killing_a_leader_during_writes_pauses_them_and_loses_no_acknowledged_write() {
    let _l = lock();
    let mut c = Cluster::start(3, 1, &[]);
    let leader = c.wait_leader(0, None);
    let seeds = c.seed_ports();
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (seeds, acked, stop) = (seeds.clone(), acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut gaps = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                let ok = set_ok(
                    &seeds,
                    &format!("key-{i}"),
                    &format!("value-{i}"),
                    t + DEADLINE,
                );
                assert!(ok, "write {i} not acknowledged within {DEADLINE:?}");
                gaps.push(t.elapsed());
                i += 1;
                acked.store(i, Ordering::SeqCst);
            }
            gaps.into_iter().max().unwrap_or_default()
        })
    };
    let wait_acked = |n: u64| wait_for_acked(&acked, n);
    wait_acked(100);
    c.kill(leader);
    let at_kill = acked.load(Ordering::SeqCst);
    wait_acked(at_kill + 100);
    stop.store(true, Ordering::SeqCst);
    let longest = writer.join().expect("writer");
    let n = acked.load(Ordering::SeqCst);
    println!("{n} writes acknowledged; longest write (spans the election): {longest:?}");
    let new_leader = c.wait_leader(0, Some(leader));
    assert_ne!(new_leader, leader);
    let deadline = Instant::now() + DEADLINE;
    for i in 0..n {
        let v = get(&seeds, &format!("key-{i}"), deadline);
        assert_eq!(
            v.as_deref(),
            Some(format!("value-{i}").as_bytes()),
            "key-{i}"
        );
    }
}

#[test]
fn a_stopped_leader_steps_down_after_sigcont_and_serves_no_stale_read() {
    let _l = lock();
    let mut c = Cluster::start(3, 1, &[]);
    let seeds = c.seed_ports();
    let old = c.wait_leader(0, None);
    let deadline = Instant::now() + DEADLINE;
    assert!(set_ok(&seeds, "x", "1", deadline));
    c.signal(old, libc::SIGSTOP);
    let new = c.wait_leader(0, Some(old));
    assert_ne!(new, old);
    let others: Vec<u16> = seeds
        .iter()
        .copied()
        .filter(|&p| p != c.port(old, 0))
        .collect();
    assert!(set_ok(&others, "x", "2", deadline));
    c.signal(old, libc::SIGCONT);
    // The old leader must never answer the old value: it either redirects, asks to retry, or
    // (once caught up) answers the new one.
    let mut conn = Resp::connect(c.port(old, 0)).expect("connect to the old leader");
    let start = Instant::now();
    loop {
        let r = conn.call(&[b"GET", b"x"]).expect("old leader answers");
        match &r {
            Frame::Bulk(b) => assert_eq!(&b[..], b"2", "stale read from the deposed leader"),
            Frame::Error(e) => {
                let t = String::from_utf8_lossy(e);
                assert!(t.starts_with("MOVED") || t.starts_with("TRYAGAIN"), "{t}");
            }
            other => panic!("unexpected {other:?}"),
        }
        let info = c.info(old, 0).unwrap_or_default();
        if info.contains("raft_role:Follower") && matches!(r, Frame::Error(_)) {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "old leader did not step down: {info}"
        );
        std::thread::sleep(POLL);
    }
}

#[test]
fn restarting_every_host_keeps_every_acknowledged_write() {
    let _l = lock();
    let mut c = Cluster::start(3, 2, &[]);
    for g in 0..2 {
        c.wait_leader(g, None);
    }
    let seeds = c.seed_ports();
    let deadline = Instant::now() + DEADLINE;
    for i in 0..200 {
        assert!(set_ok(&seeds, &format!("r{i}"), &format!("v{i}"), deadline));
    }
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.spawn(i);
    }
    for g in 0..2 {
        c.wait_leader(g, None);
    }
    let deadline = Instant::now() + DEADLINE;
    for i in 0..200 {
        assert_eq!(
            get(&seeds, &format!("r{i}"), deadline).as_deref(),
            Some(format!("v{i}").as_bytes()),
            "r{i} after restarting every host"
        );
    }
}

#[test]
fn a_host_restarted_after_the_others_compacted_catches_up_by_snapshot() {
    let _l = lock();
    let mut c = Cluster::start(
        3,
        1,
        &[
            "--snapshot-log-bytes",
            "4096",
            "--segment-bytes",
            "16777216",
        ],
    );
    let leader = c.wait_leader(0, None);
    let lagger = (leader + 1) % 3;
    c.kill(lagger);
    let seeds: Vec<u16> = (0..3)
        .filter(|&i| i != lagger)
        .map(|i| c.port(i, 0))
        .collect();
    let deadline = Instant::now() + DEADLINE;
    let value = "x".repeat(200);
    for i in 0..300 {
        assert!(set_ok(&seeds, &format!("s{i}"), &value, deadline));
    }
    let info = c.info(leader, 0).expect("leader info");
    assert!(info_field(&info, "snapshots_taken") > 0, "{info}");
    assert!(info_field(&info, "snapshot_index") > 0, "{info}");
    let commit = info_field(&info, "commit_index");
    assert!(
        info_field(&info, "wal_size_bytes") >= 16 << 20,
        "one preallocated segment: {info}"
    );
    c.spawn(lagger);
    let start = Instant::now();
    loop {
        if let Some(info) = c.info(lagger, 0) {
            if info_field(&info, "snapshots_installed") > 0
                && info_field(&info, "applied_index") >= commit
            {
                break;
            }
        }
        assert!(
            start.elapsed() < DEADLINE,
            "host {} did not catch up: {}",
            lagger + 1,
            c.log(lagger)
        );
        std::thread::sleep(POLL);
    }
    // Its own copy (READONLY: served locally) has every write.
    let mut conn = Resp::connect(c.port(lagger, 0)).unwrap();
    assert!(matches!(
        conn.call(&[b"READONLY"]).unwrap(),
        Frame::Simple(_)
    ));
    for i in 0..300 {
        let k = format!("s{i}");
        match conn.call(&[b"GET", k.as_bytes()]).unwrap() {
            Frame::Bulk(b) => assert_eq!(b.len(), 200, "{k}"),
            other => panic!("{k}: {other:?}"),
        }
    }
}

fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn blast(port: u16, bytes: &[u8]) -> Option<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    Some(out)
}

#[test]
fn malformed_peer_frames_and_malformed_resp_do_not_crash_anything() {
    let _l = lock();
    let mut c = Cluster::start(3, 1, &[]);
    c.wait_leader(0, None);
    let seeds = c.seed_ports();
    for i in 0..3 {
        let peer = c.hosts[i].peer;
        let client = c.port(i, 0);
        for seed in 0..20u64 {
            // Random bytes (no valid hello).
            blast(peer, &garbage(seed, 64 + seed as usize * 37));
            // A valid hello, then garbage frames and a truncated frame.
            let hello = tynamo::node::transport::Hello::new(
                0x7479_6e61_6d6f,
                tynamo::node::transport::CoreId { host: 9, core: 0 },
                tynamo::node::transport::CoreId {
                    host: c.hosts[i].id,
                    core: 0,
                },
            );
            let mut bytes = zerocopy::IntoBytes::as_bytes(&hello).to_vec();
            let body = garbage(seed + 100, 40 + seed as usize);
            bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&body);
            bytes.extend_from_slice(&1000u32.to_le_bytes());
            bytes.extend_from_slice(&body[..10]);
            blast(peer, &bytes);
            // RESP garbage: random bytes, absurd lengths, truncated requests.
            let r = blast(client, &garbage(seed + 7, 100));
            if let Some(r) = r {
                assert!(
                    r.is_empty()
                        || r.starts_with(b"-")
                        || r.starts_with(b"+")
                        || r.starts_with(b"$")
                        || r.starts_with(b"*")
                        || r.starts_with(b":"),
                    "{:?}",
                    String::from_utf8_lossy(&r)
                );
            }
            let r = blast(client, b"*99999999999\r\n$3\r\nGET\r\n").unwrap_or_default();
            assert!(
                r.starts_with(b"-ERR Protocol error"),
                "{:?}",
                String::from_utf8_lossy(&r)
            );
            blast(client, b"*2\r\n$3\r\nGET\r\n$100\r\nabc");
        }
    }
    for i in 0..3 {
        assert!(c.alive(i), "host {} died: {}", i + 1, c.log(i));
        let info = c.info(i, 0).expect("still answering");
        assert!(info.contains("raft_role:"), "{info}");
    }
    let deadline = Instant::now() + DEADLINE;
    assert!(set_ok(&seeds, "after", "garbage", deadline));
    assert_eq!(
        get(&seeds, "after", deadline).as_deref(),
        Some(&b"garbage"[..])
    );
    let bad: u64 = (0..3)
        .filter_map(|i| c.info(i, 0))
        .map(|s| info_field(&s, "peer_frames_bad"))
        .sum();
    assert!(
        bad > 0,
        "garbage frames after a valid hello were counted as bad"
    );
}

#[test]
fn a_retried_write_with_a_session_sequence_is_applied_once() {
    let _l = lock();
    let mut c = Cluster::start(3, 1, &[]);
    let leader = c.wait_leader(0, None);
    let port = c.port(leader, 0);
    let mut a = Resp::connect(port).unwrap();
    let int = |f: Frame| match f {
        Frame::Integer(n) => n,
        other => panic!("{other:?}"),
    };
    assert!(matches!(
        a.call(&[b"TYNAMO.SESSION", b"77"]).unwrap(),
        Frame::Simple(_)
    ));
    assert_eq!(
        int(a.call(&[b"TYNAMO.SEQ", b"1", b"1", b"INCR", b"n"]).unwrap()),
        1
    );
    // A retry of seq 1 (its reply was "lost") gets the remembered result, not a second increment.
    assert_eq!(
        int(a.call(&[b"TYNAMO.SEQ", b"1", b"1", b"INCR", b"n"]).unwrap()),
        1
    );
    assert_eq!(
        int(a.call(&[b"TYNAMO.SEQ", b"2", b"1", b"INCR", b"n"]).unwrap()),
        2
    );
    // The same client retrying on another connection is recognised too.
    let mut b = Resp::connect(port).unwrap();
    assert!(matches!(
        b.call(&[b"TYNAMO.SESSION", b"77"]).unwrap(),
        Frame::Simple(_)
    ));
    assert_eq!(
        int(b.call(&[b"TYNAMO.SEQ", b"2", b"2", b"INCR", b"n"]).unwrap()),
        2
    );
    match b.call(&[b"GET", b"n"]).unwrap() {
        Frame::Bulk(v) => assert_eq!(&v[..], b"2"),
        other => panic!("{other:?}"),
    }
    // Plain clients (no session) keep Redis' at-least-once behaviour; a sequence needs a session.
    let mut plain = Resp::connect(port).unwrap();
    match plain
        .call(&[b"TYNAMO.SEQ", b"3", b"1", b"INCR", b"n"])
        .unwrap()
    {
        Frame::Error(e) => assert!(e.starts_with(b"ERR TYNAMO.SEQ needs TYNAMO.SESSION")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_server_reads_a_toml_config_file_and_command_line_flags_win() {
    let _l = lock();
    let base = free_base(1, 1);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tynamo.toml");
    std::fs::write(
        &file,
        format!(
            "id = 1\ndata = \"{}\"\ninitial-cluster = \"1=127.0.0.1:{}/127.0.0.1:{}\"\ncores = 1\nplacement = \"unbound\"\nelection_ms = 5000\n",
            dir.path().join("data").display(),
            base + 100,
            base
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tynamo"))
        .args(["server", "--config"])
        .arg(&file)
        .args(["--election-ms", "300"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let info = loop {
        let info = Resp::connect(base)
            .ok()
            .and_then(|mut c| c.call(&[b"INFO"]).ok());
        if let Some(Frame::Bulk(b)) = info {
            let t = String::from_utf8_lossy(&b).into_owned();
            if t.contains("raft_role:Leader") {
                break t;
            }
        }
        assert!(start.elapsed() < DEADLINE, "single host never led");
        std::thread::sleep(POLL);
    };
    assert!(info.contains("host_id:1"), "{info}");
    assert!(
        info.contains("election_ms:300\r\n"),
        "the flag wins over the file: {info}"
    );
    assert!(info.contains("cores:1\r\n"), "{info}");
    let _ = child.kill();
    let _ = child.wait();
    // A bad value is reported with the file's key, and the server does not start.
    std::fs::write(&file, "id = 1\ncores = \"many\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tynamo"))
        .args(["server", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cores") || err.contains("many"), "{err}");
}

#[test]
fn demo_starts_three_hosts_and_stops_them_on_ctrl_c() {
    let _l = lock();
    let base = free_base(3, 2);
    let mut demo = Command::new(env!("CARGO_BIN_EXE_tynamo"))
        .args(["demo", "--base-port", &base.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let seeds: Vec<u16> = (0..3)
        .flat_map(|h| [base + 10 * h, base + 10 * h + 1])
        .collect();
    let deadline = Instant::now() + DEADLINE;
    assert!(set_ok(&seeds, "demo", "works", deadline));
    assert_eq!(
        get(&seeds, "demo", deadline).as_deref(),
        Some(&b"works"[..])
    );
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(demo.id() as i32, libc::SIGINT) }, 0);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = demo.try_wait().unwrap() {
            break s;
        }
        assert!(start.elapsed() < DEADLINE, "demo did not stop on SIGINT");
        std::thread::sleep(POLL);
    };
    assert!(status.success(), "{status}");
    let mut out = String::new();
    demo.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(
        out.contains(&format!("redis-cli -c -p {base} SET k v")),
        "{out}"
    );
    // Every host is gone: nothing answers on the client ports.
    for p in seeds {
        assert!(
            Resp::connect(p).is_err(),
            "port {p} still served after the demo stopped"
        );
    }
}

#[test]
fn a_request_for_another_core_of_the_same_host_is_forwarded_not_redirected() {
    let _l = lock();
    let mut c = Cluster::start(3, 2, &[]);
    c.wait_leader(0, None);
    let l1 = c.wait_leader(1, None);
    // "foo" is in slot 12182, served by group 1 (core 1); ask core 0 of group 1's leader host.
    let mut conn = Resp::connect(c.port(l1, 0)).unwrap();
    assert!(
        matches!(conn.call(&[b"SET", b"foo", b"bar"]).unwrap(), Frame::Simple(s) if &s[..] == b"OK")
    );
    match conn.call(&[b"GET", b"foo"]).unwrap() {
        Frame::Bulk(v) => assert_eq!(&v[..], b"bar"),
        other => panic!("{other:?}"),
    }
    // On a host that does not lead group 1, a READONLY connection's read is forwarded to that
    // host's replica of group 1 (a stale read: poll until replication reached it).
    let other = (l1 + 1) % 3;
    let mut ro = Resp::connect(c.port(other, 0)).unwrap();
    assert!(matches!(ro.call(&[b"READONLY"]).unwrap(), Frame::Simple(_)));
    let start = Instant::now();
    loop {
        match ro.call(&[b"GET", b"foo"]).unwrap() {
            Frame::Bulk(v) if &v[..] == b"bar" => break,
            Frame::Null | Frame::Bulk(_) => {}
            other => panic!("{other:?}"),
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the follower never got the write"
        );
        std::thread::sleep(POLL);
    }
    // Without READONLY the same host redirects to the leader's core.
    let mut rw = Resp::connect(c.port(other, 0)).unwrap();
    match rw.call(&[b"GET", b"foo"]).unwrap() {
        Frame::Error(e) => {
            let want = format!("MOVED 12182 127.0.0.1:{}", c.port(l1, 1));
            assert_eq!(String::from_utf8_lossy(&e), want);
        }
        other => panic!("{other:?}"),
    }
}

fn int(f: Frame) -> i64 {
    match f {
        Frame::Integer(n) => n,
        other => panic!("expected an integer, got {other:?}"),
    }
}

#[test]
fn a_sequenced_write_for_another_core_is_forwarded_with_its_session_and_applied_once() {
    let _l = lock();
    let mut c = Cluster::start(3, 2, &[]);
    c.wait_leader(0, None);
    let l1 = c.wait_leader(1, None);
    // "foo" (slot 12182) belongs to group 1; the session is declared on core 0 of group 1's
    // leader host, which may or may not lead group 0 (OK or MOVED: the id stays either way).
    let mut a = Resp::connect(c.port(l1, 0)).unwrap();
    match a.call(&[b"TYNAMO.SESSION", b"4242"]).unwrap() {
        Frame::Simple(_) => {}
        Frame::Error(e) => assert!(e.starts_with(b"MOVED 0 "), "{e:?}"),
        other => panic!("{other:?}"),
    }
    let seq = |a: &mut Resp, n: &[u8]| a.call(&[b"TYNAMO.SEQ", n, b"1", b"INCR", b"foo"]);
    // Forwarded to core 1 (an integer, not a MOVED), which opens the session there first.
    assert_eq!(int(seq(&mut a, b"1").unwrap()), 1);
    // The retry of seq 1 is recognised through the forwarding path too.
    assert_eq!(int(seq(&mut a, b"1").unwrap()), 1);
    assert_eq!(int(seq(&mut a, b"2").unwrap()), 2);
    // The same client at the owning core directly: the session forwarded there is the one it
    // finds, so its retry of seq 2 is a duplicate.
    let mut b = Resp::connect(c.port(l1, 1)).unwrap();
    assert!(matches!(
        b.call(&[b"TYNAMO.SESSION", b"4242"]).unwrap(),
        Frame::Simple(_)
    ));
    assert_eq!(
        int(b
            .call(&[b"TYNAMO.SEQ", b"2", b"1", b"INCR", b"foo"])
            .unwrap()),
        2
    );
    match b.call(&[b"GET", b"foo"]).unwrap() {
        Frame::Bulk(v) => assert_eq!(&v[..], b"2"),
        other => panic!("{other:?}"),
    }
    // A sequence still needs a session, forwarded or not.
    let mut plain = Resp::connect(c.port(l1, 0)).unwrap();
    match plain
        .call(&[b"TYNAMO.SEQ", b"3", b"1", b"INCR", b"foo"])
        .unwrap()
    {
        Frame::Error(e) => assert!(e.starts_with(b"ERR TYNAMO.SEQ needs TYNAMO.SESSION")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_session_sent_to_a_follower_is_redirected_to_its_groups_leader_and_the_client_follows() {
    let _l = lock();
    let mut c = Cluster::start(3, 2, &[]);
    c.wait_leader(0, None);
    let l1 = c.wait_leader(1, None);
    let follower = (l1 + 1) % 3;
    // Group 1 serves shards 32..64 of 64, whose first slot is 8192: the redirect names a slot
    // of that group (not slot 0, which is group 0's), at group 1's leader core.
    let mut raw = Resp::connect(c.port(follower, 1)).unwrap();
    match raw.call(&[b"TYNAMO.SESSION", b"31337"]).unwrap() {
        Frame::Error(e) => assert_eq!(
            String::from_utf8_lossy(&e),
            format!("MOVED 8192 127.0.0.1:{}", c.port(l1, 1))
        ),
        other => panic!("a follower must redirect the session: {other:?}"),
    }
    // The client library given only that follower as a seed: the session's MOVED is followed
    // (no error), and its sequenced writes reach the leader exactly once.
    let seed = SocketAddr::from(([127, 0, 0, 1], c.port(follower, 1)));
    let (value, exactly_once) = tynamo::client::network_executor("session-test")
        .spawn(move || async move {
            let mut client = tynamo::client::ClusterClient::connect_cluster(
                &[seed],
                tynamo::client::ClientOptions::default(),
            )
            .await
            .expect("a follower seed gives the slot map");
            let reply = client.call(&[b"INCR", b"foo"]).await.expect("INCR");
            (reply, client.exactly_once())
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(value, Frame::Integer(1));
    assert!(exactly_once, "the client fell back to plain writes");
}

/// Pids whose parent is `parent` (from /proc/*/stat; field 4 is the parent pid).
fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The command name may hold spaces: the fields after it follow the last ')'.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let ppid: Option<u32> = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

/// Whether `pid` still runs (a zombie nobody reaped yet counts as gone).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

#[test]
fn demo_killed_with_sigkill_takes_its_three_hosts_with_it() {
    let _l = lock();
    let base = free_base(3, 2);
    let mut demo = Command::new(env!("CARGO_BIN_EXE_tynamo"))
        .args(["demo", "--base-port", &base.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let seeds: Vec<u16> = (0..3)
        .flat_map(|h| [base + 10 * h, base + 10 * h + 1])
        .collect();
    let deadline = Instant::now() + DEADLINE;
    assert!(set_ok(&seeds, "pdeathsig", "1", deadline));
    let hosts = children_of(demo.id());
    assert_eq!(hosts.len(), 3, "the demo runs three hosts: {hosts:?}");
    demo.kill().unwrap();
    demo.wait().unwrap();
    // A process whose main thread exited shows as a zombie while its other threads (the
    // executors, holding the sockets) wind down: wait for the ports to close too.
    let start = Instant::now();
    let served = |seeds: &[u16]| seeds.iter().any(|&p| Resp::connect(p).is_ok());
    while hosts.iter().any(|&p| running(p)) || served(&seeds) {
        assert!(
            start.elapsed() < DEADLINE,
            "hosts {:?} outlived their demo (ports served: {})",
            hosts.iter().filter(|&&p| running(p)).collect::<Vec<_>>(),
            served(&seeds)
        );
        std::thread::sleep(POLL);
    }
    for p in seeds {
        assert!(
            Resp::connect(p).is_err(),
            "port {p} still served after the demo was killed"
        );
    }
}

#[test]
fn server_help_documents_the_config_file_and_a_one_machine_layout_that_validates() {
    let out = Command::new(env!("CARGO_BIN_EXE_tynamo"))
        .args(["server", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("--config <FILE.toml>"), "{help}");
    assert!(help.contains("initial-cluster = "), "{help}");
    let map = help
        .lines()
        .find_map(|l| l.trim().strip_prefix("MAP="))
        .expect("a one-machine map in --help");
    let hosts = tynamo::node::parse_initial_cluster(map).unwrap();
    assert_eq!(hosts.len(), 3);
    for id in 1..=3 {
        tynamo::node::ServerConfig::new(id, "/tmp/x".into(), hosts.clone(), 2)
            .validate()
            .unwrap();
    }
    // The one-machine example is refused, naming both users of the shared port.
    let out = Command::new(env!("CARGO_BIN_EXE_tynamo"))
        .args([
            "server",
            "--id",
            "1",
            "--data",
            "/nonexistent/tynamo-help-test",
        ])
        .args([
            "--initial-cluster",
            "1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103",
        ])
        .args(["--cores", "2", "--client-addr", "127.0.0.1:7001"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "127.0.0.1:7002 is both host 1 core 1's client port and host 2 core 0's client port"
        ),
        "{err}"
    );
}

#[test]
fn the_client_library_rides_out_a_killed_leader_without_an_error() {
    let _l = lock();
    let mut c = Cluster::start(3, 1, &[]);
    let leader = c.wait_leader(0, None);
    let seeds: Vec<SocketAddr> = c
        .seed_ports()
        .into_iter()
        .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
        .collect();
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // One client with default options writes in a loop. When the leader dies, its connection is
    // refused until the slot map names the new leader: every write must still succeed (the
    // client re-reads the map after a connection failure and backs off through the election).
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        tynamo::client::network_executor("failover-test")
            .spawn(move || async move {
                let mut client = tynamo::client::ClusterClient::connect_cluster(
                    &seeds,
                    tynamo::client::ClientOptions::default(),
                )
                .await
                .expect("slot map");
                let mut i = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let (k, v) = (format!("fo-{i}"), format!("value-{i}"));
                    if let Err(e) = client.call(&[b"SET", k.as_bytes(), v.as_bytes()]).await {
                        return Err(format!("write {i}: {e}"));
                    }
                    i += 1;
                    acked.store(i, Ordering::SeqCst);
                }
                Ok(i)
            })
            .unwrap()
    };
    let wait_acked = |n: u64| wait_for_acked(&acked, n);
    wait_acked(50);
    c.kill(leader);
    let at_kill = acked.load(Ordering::SeqCst);
    wait_acked(at_kill + 50);
    stop.store(true, Ordering::SeqCst);
    let n = writer
        .join()
        .unwrap()
        .expect("no write may fail across the failover");
    assert_ne!(c.wait_leader(0, Some(leader)), leader);
    let ports = c.seed_ports();
    let deadline = Instant::now() + DEADLINE;
    for i in 0..n {
        let v = get(&ports, &format!("fo-{i}"), deadline);
        assert_eq!(
            v.as_deref(),
            Some(format!("value-{i}").as_bytes()),
            "fo-{i}"
        );
    }
}
