//! Test support: start throwaway redis-server processes (standalone or a 3-master Redis
//! Cluster) on free loopback ports, and stop them when dropped. Included by the Redis tests with
//! `#[path]`; compiled alone it has no tests.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether redis-server can be run here. Without it the Redis tests are skipped loudly, except
/// under CI (`CI` set), where a missing redis-server is a failure.
pub fn redis_available() -> bool {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!(
                "redis-server is not installed but CI is set: install redis-server and redis-tools"
            );
        }
        eprintln!("\n*** SKIPPED: redis-server is not installed (apt-get install redis-server redis-tools) ***\n");
    }
    found
}

/// A loopback port that is free now, with `port + 10000` (the cluster bus) free as well.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let Ok(l) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(addr) = l.local_addr() else { continue };
        let port = addr.port();
        if port < 55535 && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port pair found");
}

/// Waits (bounded) until `check` holds, polling; panics with `what` on the deadline.
pub fn wait_until(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One redis-server child process, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts redis-server on a free port. A port taken between choosing and binding it (by a
    /// test running in parallel) makes redis-server exit: then another port is tried.
    pub fn start(extra: &[&str]) -> RedisServer {
        const ATTEMPTS: usize = 5;
        for _ in 0..ATTEMPTS {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_port();
            let child = Command::new("redis-server")
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--daemonize",
                    "no",
                ])
                .args(["--dir", dir.path().to_str().expect("utf-8 tempdir")])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn redis-server");
            let mut server = RedisServer {
                port,
                child,
                _dir: dir,
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = server.child.try_wait() {
                    break; // exited: most likely the port was taken; try another
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok()
                    && redis_cli(port, &["PING"]) == "PONG"
                {
                    return server;
                }
                assert!(
                    Instant::now() < deadline,
                    "redis-server on port {port} did not answer PING within 10 s"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("redis-server failed to start {ATTEMPTS} times");
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn dir(&self) -> &Path {
        self._dir.path()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three masters, no replicas, slots split evenly by `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start(&["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for n in &nodes {
            wait_until("cluster_state:ok", Duration::from_secs(20), || {
                redis_cli(n.port, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
            });
        }
        RedisCluster { nodes }
    }

    pub fn node_id(&self, i: usize) -> String {
        redis_cli(self.nodes[i].port, &["CLUSTER", "MYID"])
    }

    /// Index of the node that owns `slot`.
    pub fn owner_of(&self, slot: u16) -> usize {
        for (i, n) in self.nodes.iter().enumerate() {
            // Each node's own line in CLUSTER NODES ends with the slot ranges it serves.
            let nodes = redis_cli(n.port, &["CLUSTER", "NODES"]);
            for line in nodes.lines().filter(|l| l.contains("myself")) {
                for range in line.split_whitespace().skip(8) {
                    let (a, b) = match range.split_once('-') {
                        Some((a, b)) => (a.parse::<u16>(), b.parse::<u16>()),
                        None => (range.parse::<u16>(), range.parse::<u16>()),
                    };
                    if let (Ok(a), Ok(b)) = (a, b) {
                        if a <= slot && slot <= b {
                            return i;
                        }
                    }
                }
            }
        }
        panic!("no node owns slot {slot}");
    }
}
