//! `--local`: run a throwaway 3-host TynamoDB cluster for the duration of the benchmark.
//!
//! We start the three `tynamo server` processes ourselves (the binary next to this one, or
//! `$TYNAMO_BIN`) rather than `tynamo demo`, so that we own every piece the run depends on:
//! - ports: a free block is chosen (or `--local-base-port`), so a run never collides with a demo
//!   or another benchmark on the default ports (glommio listeners set SO_REUSEPORT, so a second
//!   cluster on the same ports would silently share them instead of failing);
//! - data: a temporary directory, one `host-N` directory and one `host-N.log` (the server's
//!   stdout and stderr) per host, removed when the run ends;
//! - readiness: the run starts once every group has a leader (asked with `INFO` on each core),
//!   not when a port first accepts (a port accepts long before an election is over);
//! - shutdown: on success, failure or Ctrl-C the hosts get SIGTERM, then SIGKILL after
//!   [`STOP_TIMEOUT`], and are reaped before the directory is removed. Ctrl-C / SIGTERM / SIGHUP
//!   are blocked in every thread of ours and taken by one thread with `sigwait`, which stops the
//!   cluster and exits 130 (128 + signal). A bench killed outright (SIGKILL) cannot clean up: each
//!   host has `PR_SET_PDEATHSIG = SIGKILL`, so at least no host outlives it.
//!
//! Layout (as `tynamo demo`): host h (1..=3) serves clients on `base + 10 (h - 1) + core` and
//! peers on that + 100, so a host has at most 10 cores here.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Hosts of the local cluster (a group has one replica on each).
pub const HOSTS: u16 = 3;
/// Cores per host this layout has ports for.
pub const CORES_MAX: u16 = 10;
const PORT_STRIDE_HOST: u16 = 10;
const PORT_OFFSET_PEER: u16 = 100;
/// Ports tried for an automatic base: below the usual ephemeral range (32768..), so an outgoing
/// connection does not hold one of ours.
const BASE_PORT_RANGE: std::ops::Range<u16> = 10_000..30_000;
const BASE_PORT_TRIES_MAX: usize = 64;
/// Attempts at starting the cluster (another process may take a port between our check and the
/// server's bind; the server then exits and we try another block).
const START_ATTEMPTS_MAX: usize = 3;
/// How long the cluster may take to elect a leader in every group.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the hosts may take to stop after SIGTERM before they are killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(50);
/// Bound on one INFO exchange during the readiness check.
const INFO_TIMEOUT: Duration = Duration::from_millis(500);
const INFO_BYTES_MAX: usize = 1 << 20;
/// Log lines of a failed host shown in the error.
const LOG_TAIL_LINES: usize = 15;
/// Extra arguments passed on to every `tynamo server`.
pub const SERVER_ARGS_MAX: usize = 64;

/// How to run the local cluster.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// Executors (= groups) per host.
    pub cores: u16,
    /// Client port of host 1 core 0; `None`: a free block is chosen.
    pub base_port: Option<u16>,
    /// Passed to every `tynamo server` after ours (e.g. `--window 4`).
    pub server_args: Vec<String>,
}

struct Host {
    id: u16,
    child: Child,
    log: PathBuf,
}

/// The processes and the directory, shared with the signal thread.
struct State {
    hosts: Vec<Host>,
    dir: Option<tempfile::TempDir>,
}

/// A running local cluster; dropping it stops it and removes its data.
pub struct LocalCluster {
    state: Arc<Mutex<State>>,
    /// Every core's client address (host 1 core 0 first).
    pub seeds: Vec<SocketAddr>,
}

fn tynamo_binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("TYNAMO_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot locate tynamo-bench itself: {e}"))?;
    let sibling = exe.with_file_name("tynamo");
    if sibling.exists() {
        Ok(sibling)
    } else {
        Err(format!(
            "--local is not available: no tynamo binary at {} (build it with `cargo build \
             --release --bins`, or set TYNAMO_BIN)",
            sibling.display()
        ))
    }
}

fn client_port(base: u16, host: u16, core: u16) -> u16 {
    base + PORT_STRIDE_HOST * (host - 1) + core
}

fn peer_port(base: u16, host: u16, core: u16) -> u16 {
    client_port(base, host, core) + PORT_OFFSET_PEER
}

/// Every port the cluster will listen on, or an error when the layout does not fit in u16.
fn cluster_ports(base: u16, cores: u16) -> Result<Vec<u16>, String> {
    let top = u32::from(base)
        + u32::from(PORT_STRIDE_HOST) * u32::from(HOSTS - 1)
        + u32::from(PORT_OFFSET_PEER)
        + u32::from(cores);
    if base == 0 || top > u32::from(u16::MAX) {
        return Err(format!(
            "--local-base-port {base}: the cluster needs ports {base}..{top}"
        ));
    }
    let mut ports = Vec::with_capacity(usize::from(HOSTS * cores * 2));
    for h in 1..=HOSTS {
        for c in 0..cores {
            ports.push(client_port(base, h, c));
            ports.push(peer_port(base, h, c));
        }
    }
    Ok(ports)
}

/// `--initial-cluster` for the layout: `id=peer/client,...`.
pub fn initial_cluster(base: u16) -> String {
    (1..=HOSTS)
        .map(|h| {
            format!(
                "{h}=127.0.0.1:{}/127.0.0.1:{}",
                peer_port(base, h, 0),
                client_port(base, h, 0)
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn ports_free(ports: &[u16]) -> bool {
    // A listener (ours is dropped at once) fails to bind where anything listens, including a
    // glommio listener with SO_REUSEPORT (we do not set it).
    ports
        .iter()
        .all(|&p| TcpListener::bind(("127.0.0.1", p)).is_ok())
}

fn choose_base_port(cores: u16) -> Result<u16, String> {
    let span = BASE_PORT_RANGE.end - BASE_PORT_RANGE.start;
    for _ in 0..BASE_PORT_TRIES_MAX {
        let base = BASE_PORT_RANGE.start + rand::random::<u16>() % span;
        let ports = cluster_ports(base, cores)?;
        if ports_free(&ports) {
            return Ok(base);
        }
    }
    Err(format!(
        "--local: no free block of ports found in {BASE_PORT_RANGE:?} after \
         {BASE_PORT_TRIES_MAX} tries (give --local-base-port)"
    ))
}

/// The last lines of a host's log, indented, for an error message.
fn log_tail(path: &Path) -> String {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => return format!("    (cannot read {}: {e})", path.display()),
    };
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(LOG_TAIL_LINES);
    if lines.is_empty() {
        return "    (log is empty)".to_string();
    }
    lines[from..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One `INFO` round trip on a fresh connection; `None` on any failure (not ready yet).
fn info(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, INFO_TIMEOUT).ok()?;
    s.set_read_timeout(Some(INFO_TIMEOUT)).ok()?;
    s.set_write_timeout(Some(INFO_TIMEOUT)).ok()?;
    s.write_all(b"*1\r\n$4\r\nINFO\r\n").ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + INFO_TIMEOUT;
    loop {
        // A bulk string: `$<len>\r\n<len bytes>\r\n`.
        if let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") {
            if buf.first() != Some(&b'$') {
                return None;
            }
            let len: usize = std::str::from_utf8(&buf[1..eol]).ok()?.parse().ok()?;
            if len > INFO_BYTES_MAX {
                return None;
            }
            if buf.len() >= eol + 2 + len {
                return Some(String::from_utf8_lossy(&buf[eol + 2..eol + 2 + len]).into_owned());
            }
        }
        if buf.len() > INFO_BYTES_MAX || Instant::now() > deadline {
            return None;
        }
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Whether an INFO text says this core leads its group.
pub fn info_says_leader(text: &str) -> bool {
    text.lines().any(|l| l.trim_end() == "raft_role:Leader")
}

/// Whether an INFO text says this host serves the whole keyspace: every group it lists has a
/// known leader and no shard on its way in or out, and the groups serve `shard_count` shards
/// between them. Right after the elections a host may still answer `-TRYAGAIN` (a follower
/// that has not heard from its new leader yet; the shards the controller is still handing to
/// their groups), which a run would count as latency of its first requests: 0.3-0.65 s, the
/// client's backoff, in about one start in four (2026-12-07).
pub fn info_says_settled(text: &str) -> bool {
    let field = |line: &str, name: &str| -> Option<u64> {
        line.split([':', ','])
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.trim_end().parse().ok())
    };
    let Some(shards) = text.lines().find_map(|l| {
        l.trim_end()
            .strip_prefix("shard_count:")?
            .parse::<u64>()
            .ok()
    }) else {
        return false;
    };
    let (mut groups, mut serving) = (0u32, 0u64);
    for line in text
        .lines()
        .filter(|l| l.starts_with("group") && l.contains(":core="))
    {
        let leader = field(line, "leader");
        let in_flight = field(line, "in_flight");
        let Some(n) = field(line, "serving") else {
            return false;
        };
        if matches!(leader, None | Some(0)) || in_flight != Some(0) {
            return false;
        }
        groups += 1;
        serving += n;
    }
    groups > 0 && serving == shards
}

/// Why SIGINT, SIGTERM and SIGHUP are blocked: see the module comment.
fn handled_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before sigaddset reads it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Blocks the signals in this thread (and so in every thread it starts later) and starts the
/// thread that takes them. Must run before any other thread is started.
fn take_signals(state: Arc<Mutex<State>>) -> Result<(), String> {
    let set = handled_signals();
    // SAFETY: `set` is an initialised sigset_t; a null old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(format!("--local: cannot block signals (error {rc})"));
    }
    std::thread::Builder::new()
        .name("local-signals".into())
        .spawn(move || loop {
            let mut signal: libc::c_int = 0;
            // SAFETY: `set` is initialised and blocked in this thread; `signal` is a valid out
            // pointer.
            if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
                continue;
            }
            eprintln!("tynamo-bench: signal {signal}: stopping the local cluster");
            let mut s = lock(&state);
            stop(&mut s);
            // Exit with the lock still held. Stopping the hosts makes the load threads fail
            // ("cannot connect"), and the main thread then returns its own error, status 2;
            // but it ends only through `LocalCluster`'s drop, which takes this lock, so it
            // waits here and the status is always ours, 128 + signal. Released before the
            // exit, the lock let the main thread exit 2 first now and then (seen under load).
            std::process::exit(128 + signal);
        })
        .map_err(|e| format!("--local: cannot start the signal thread: {e}"))?;
    Ok(())
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A thread that panicked while holding the lock left the state as consistent as any: the
    // hosts must still be stopped.
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn signal_host(host: &Host, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(host.child.id()) else {
        return;
    };
    // SAFETY: kill(2) on the pid of our own child, which is not reaped yet (the callers check
    // try_wait first), so the pid cannot have been reused.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Stops every host (SIGTERM, bounded wait, SIGKILL), reaps them, removes the data directory.
/// Idempotent.
fn stop(state: &mut State) {
    for h in state.hosts.iter_mut() {
        if let Ok(None) = h.child.try_wait() {
            signal_host(h, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_TIMEOUT;
    while Instant::now() < deadline
        && state
            .hosts
            .iter_mut()
            .any(|h| matches!(h.child.try_wait(), Ok(None)))
    {
        std::thread::sleep(POLL);
    }
    for h in state.hosts.iter_mut() {
        if let Ok(None) = h.child.try_wait() {
            eprintln!(
                "tynamo-bench: host {} did not stop within {STOP_TIMEOUT:?}: killed",
                h.id
            );
            signal_host(h, libc::SIGKILL);
        }
        let _ = h.child.wait();
    }
    state.hosts.clear();
    if let Some(dir) = state.dir.take() {
        let path = dir.path().to_path_buf();
        if let Err(e) = dir.close() {
            eprintln!("tynamo-bench: cannot remove {}: {e}", path.display());
        }
    }
}

fn spawn_host(
    binary: &Path,
    dir: &Path,
    id: u16,
    map: &str,
    options: &LocalOptions,
) -> Result<Host, String> {
    let log = dir.join(format!("host-{id}.log"));
    let out = std::fs::File::create(&log)
        .map_err(|e| format!("--local: cannot create {}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("--local: cannot reopen {}: {e}", log.display()))?;
    let parent = std::process::id();
    let mut cmd = Command::new(binary);
    cmd.args(["server", "--id", &id.to_string()])
        .arg("--data")
        .arg(dir.join(format!("host-{id}")))
        .args(["--initial-cluster", map])
        .args(["--cores", &options.cores.to_string()])
        .args(["--placement", "unbound"])
        .args(&options.server_args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // Not in our process group: a Ctrl-C typed at the terminal is ours to handle, and we
        // stop the hosts in order.
        .process_group(0);
    let blocked = handled_signals();
    // SAFETY: the closure runs in the child between fork and exec and calls only sigprocmask,
    // prctl, getppid and _exit, which are async-signal-safe; `blocked` is a copy it owns.
    unsafe {
        cmd.pre_exec(move || {
            // The mask survives exec: a host would ignore our SIGTERM (and Ctrl-C) without this.
            libc::sigprocmask(libc::SIG_UNBLOCK, &blocked, std::ptr::null_mut());
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            // We may have died between fork and prctl: then nobody would stop this host.
            if libc::getppid() as u32 != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| format!("--local: cannot start {} server: {e}", binary.display()))?;
    Ok(Host { id, child, log })
}

/// Why a start attempt failed: a host exited (perhaps a port race: try again) or anything else.
enum StartError {
    HostExited(String),
    Fatal(String),
}

impl LocalCluster {
    /// Starts the cluster and waits until every group has a leader. Call before starting any
    /// other thread (signals are blocked here for all threads started later).
    pub fn start(options: &LocalOptions) -> Result<LocalCluster, String> {
        if options.cores == 0 || options.cores > CORES_MAX {
            return Err(format!("--local-cores must be in 1..={CORES_MAX}"));
        }
        if options.server_args.len() > SERVER_ARGS_MAX {
            return Err(format!(
                "at most {SERVER_ARGS_MAX} --local-server-arg values"
            ));
        }
        let binary = tynamo_binary()?;
        let state = Arc::new(Mutex::new(State {
            hosts: Vec::new(),
            dir: None,
        }));
        take_signals(state.clone())?;
        let mut last = String::new();
        for attempt in 1..=START_ATTEMPTS_MAX {
            let base = match options.base_port {
                Some(b) => {
                    cluster_ports(b, options.cores)?;
                    b
                }
                None => choose_base_port(options.cores)?,
            };
            match Self::try_start(&binary, base, options, &state) {
                Ok(cluster) => return Ok(cluster),
                Err(StartError::Fatal(e)) => {
                    stop(&mut lock(&state));
                    return Err(e);
                }
                Err(StartError::HostExited(e)) => {
                    stop(&mut lock(&state));
                    if options.base_port.is_some() {
                        return Err(e);
                    }
                    eprintln!("tynamo-bench: local cluster attempt {attempt} failed: {e}");
                    last = e;
                }
            }
        }
        Err(last)
    }

    fn try_start(
        binary: &Path,
        base: u16,
        options: &LocalOptions,
        state: &Arc<Mutex<State>>,
    ) -> Result<LocalCluster, StartError> {
        let dir = tempfile::Builder::new()
            .prefix("tynamo-bench-local-")
            .tempdir()
            .map_err(|e| {
                StartError::Fatal(format!("--local: cannot create a temporary directory: {e}"))
            })?;
        let data_dir = dir.path().to_path_buf();
        let map = initial_cluster(base);
        {
            let mut s = lock(state);
            s.dir = Some(dir);
            for id in 1..=HOSTS {
                let host =
                    spawn_host(binary, &data_dir, id, &map, options).map_err(StartError::Fatal)?;
                s.hosts.push(host);
            }
        }
        eprintln!(
            "tynamo-bench: local cluster: {HOSTS} hosts x {} cores, clients on 127.0.0.1:{}.., \
             data and logs in {}",
            options.cores,
            base,
            data_dir.display()
        );
        let mut seeds = Vec::new();
        for h in 1..=HOSTS {
            for c in 0..options.cores {
                seeds.push(SocketAddr::from(([127, 0, 0, 1], client_port(base, h, c))));
            }
        }
        let started = Instant::now();
        loop {
            {
                let mut s = lock(state);
                for h in s.hosts.iter_mut() {
                    if let Ok(Some(status)) = h.child.try_wait() {
                        return Err(StartError::HostExited(format!(
                            "--local: host {} exited ({status}) before the cluster was ready; its log:\n{}",
                            h.id,
                            log_tail(&h.log)
                        )));
                    }
                }
            }
            let led: Vec<bool> = (0..options.cores)
                .map(|c| {
                    (1..=HOSTS).any(|h| {
                        let addr = SocketAddr::from(([127, 0, 0, 1], client_port(base, h, c)));
                        info(addr).is_some_and(|t| info_says_leader(&t))
                    })
                })
                .collect();
            let settled = led.iter().all(|&l| l)
                && (1..=HOSTS).all(|h| {
                    (0..options.cores).all(|c| {
                        let addr = SocketAddr::from(([127, 0, 0, 1], client_port(base, h, c)));
                        info(addr).is_some_and(|t| info_says_settled(&t))
                    })
                });
            if settled {
                eprintln!(
                    "tynamo-bench: local cluster ready in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                return Ok(LocalCluster {
                    state: state.clone(),
                    seeds,
                });
            }
            if started.elapsed() > READY_TIMEOUT {
                let missing: Vec<String> = led
                    .iter()
                    .enumerate()
                    .filter(|(_, &l)| !l)
                    .map(|(g, _)| g.to_string())
                    .collect();
                return Err(StartError::Fatal(format!(
                    "--local: no leader in group(s) {} within {READY_TIMEOUT:?}; logs in {} \
                     (removed on exit), host 1:\n{}",
                    missing.join(", "),
                    data_dir.display(),
                    log_tail(&data_dir.join("host-1.log"))
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    /// Hosts that exited during the run (a crash under load), each with its log's tail.
    pub fn exited_hosts(&self) -> Vec<String> {
        let mut s = lock(&self.state);
        s.hosts
            .iter_mut()
            .filter_map(|h| match h.child.try_wait() {
                Ok(Some(status)) => Some(format!(
                    "host {} exited during the run ({status}); its log:\n{}",
                    h.id,
                    log_tail(&h.log)
                )),
                _ => None,
            })
            .collect()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        stop(&mut lock(&self.state));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_matches_the_demo_and_fits_in_u16() {
        assert_eq!(
            initial_cluster(7001),
            "1=127.0.0.1:7101/127.0.0.1:7001,2=127.0.0.1:7111/127.0.0.1:7011,\
             3=127.0.0.1:7121/127.0.0.1:7021"
        );
        let ports = cluster_ports(7001, 2).unwrap();
        assert_eq!(ports.len(), 12);
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), 12, "no two listeners share a port: {ports:?}");
        assert!(ports.contains(&7022) && ports.contains(&7122));
        assert!(cluster_ports(65_500, 2).is_err());
        assert!(cluster_ports(0, 2).is_err());
        // Ten cores per host still leave the hosts' ranges apart.
        let ten = cluster_ports(20_000, CORES_MAX).unwrap();
        let mut unique = ten.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ten.len());
    }

    #[test]
    fn a_port_in_use_is_not_free() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = held.local_addr().unwrap().port();
        assert!(!ports_free(&[port]));
        drop(held);
    }

    #[test]
    fn leader_role_is_read_from_info() {
        let info = "# Raft\r\ngroup:0\r\nraft_role:Leader\r\nterm:3\r\n";
        assert!(info_says_leader(info));
        assert!(!info_says_leader("# Raft\r\nraft_role:Follower\r\n"));
        assert!(!info_says_leader("raft_role:LeaderElect\r\n"));
    }

    #[test]
    fn a_settled_host_knows_every_leader_and_serves_every_shard() {
        let line = |g: u32, leader: u32, serving: u32, in_flight: u32| {
            format!(
                "group{g}:core={},role=follower,leader={leader},leader_core=0,term=2,commit=4,\
                 applied=4,config=2,serving={serving},in_flight={in_flight},retired=0\r\n",
                g - 1
            )
        };
        let info = |lines: &[String]| {
            format!(
                "# Config\r\nshard_count:64\r\n\r\n# Groups\r\n{}\r\n# Cluster\r\n",
                lines.concat()
            )
        };
        assert!(info_says_settled(&info(&[
            line(1, 2, 32, 0),
            line(2, 3, 32, 0)
        ])));
        // A group whose leader this host does not know yet.
        assert!(!info_says_settled(&info(&[
            line(1, 0, 32, 0),
            line(2, 3, 32, 0)
        ])));
        // Shards still being handed to their group.
        assert!(!info_says_settled(&info(&[
            line(1, 2, 32, 0),
            line(2, 3, 0, 0)
        ])));
        assert!(!info_says_settled(&info(&[
            line(1, 2, 32, 0),
            line(2, 3, 30, 2)
        ])));
        // No groups listed, or no shard count.
        assert!(!info_says_settled(&info(&[])));
        assert!(!info_says_settled(&line(1, 2, 64, 0)));
    }
}
