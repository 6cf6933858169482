//! `tynamo`: the server and the local demo cluster.
//!
//! `tynamo server --id 1 --data DIR --client-addr 127.0.0.1:7001 --peer-addr 127.0.0.1:7101
//!   --initial-cluster 1=127.0.0.1:7101/127.0.0.1:7001,2=...,3=... --cores 2`
//! (or `--config FILE.toml` with the same keys, e.g. `id = 1`, `initial-cluster = "..."`; flags
//! given on the command line win over the file).
//!
//! A host added later: `tynamo server --id 4 --data DIR --peer-addr P --client-addr C --cores 2
//! --join ANY_HOST:CLIENT_PORT`, and `tynamo ctl --cluster ANY join 4=P,C,2` (either first).
//!
//! `tynamo demo`: three server processes on loopback, data in a temporary directory unless
//! `--data` is given; Ctrl-C stops them.

use std::net::SocketAddr;

/// mimalloc instead of glibc malloc: the hot path allocates and frees a few small buffers per
/// request on every core (values stored and replaced, reply slots, decoded batches), and glibc's
/// per-thread caches hold 7 chunks of a size before falling back to the arena (`_int_free`,
/// `malloc_consolidate`, heap trimming with `mprotect`): 7.5% of a leader's and 10% of a
/// follower's CPU under the write workload.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tynamo::node::config::{format_initial_cluster, ConfigError, HostAddrs};
use tynamo::node::{parse_initial_cluster, PlacementMode, ServerConfig};
use tynamo::raft::ReadMode;

#[derive(Parser)]
#[command(
    name = "tynamo",
    version,
    about = "TynamoDB: a sharded, Raft-replicated key-value store"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one host of a cluster.
    Server(Box<ServerArgs>),
    /// Start a local 3-host cluster (three child processes) and wait for Ctrl-C.
    Demo(DemoArgs),
    /// Ask the controller: configurations, cluster status, Join and Leave of hosts, Move of a
    /// shard (all live).
    Ctl(CtlArgs),
}

#[derive(Args)]
struct CtlArgs {
    /// Any host's client address (core 0's port reaches the controller with fewer redirects).
    #[arg(long, value_name = "HOST:PORT")]
    cluster: String,
    /// Print the controller's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Give up after this long (redirects, elections and unreachable hosts are retried).
    #[arg(long, global = true, default_value_t = 10_000)]
    timeout_ms: u64,
    #[command(subcommand)]
    op: CtlOp,
}

#[derive(Subcommand)]
enum CtlOp {
    /// Configuration N, or the latest (also with -1).
    Query {
        #[arg(allow_negative_numbers = true)]
        num: Option<i64>,
    },
    /// Hosts, cores, groups with leader, term, commit and applied index, shards per group,
    /// transfers in flight, every host's replicas (each host is asked).
    Status,
    /// Add hosts: each `ID=PEER_ADDR,CLIENT_ADDR,CORES` (core 0's addresses; the host runs
    /// `tynamo server --join`). The controller creates the groups their cores call for and
    /// moves shards to them.
    Join {
        #[arg(required = true)]
        hosts: Vec<String>,
    },
    /// Retire hosts by id: their groups' shards move to the other groups, then those groups'
    /// replicas are removed. Keep a leaving host running until `status` shows no replica on it.
    Leave {
        #[arg(required = true)]
        hosts: Vec<u64>,
    },
    /// Move one shard to one group.
    Move { shard: u16, group: u64 },
}

const SERVER_HELP: &str = "\
Addresses: core c of a host listens for clients on its client port + c and for peers on its
peer port + c, so hosts that share an IP need base ports at least --cores apart.

Three hosts on one machine, 2 cores each (ports 10 apart, as `tynamo demo` lays them out):
  MAP=1=127.0.0.1:7101/127.0.0.1:7001,2=127.0.0.1:7111/127.0.0.1:7011,3=127.0.0.1:7121/127.0.0.1:7021
  tynamo server --id 1 --data /tmp/t1 --initial-cluster $MAP --cores 2 --placement unbound
  tynamo server --id 2 --data /tmp/t2 --initial-cluster $MAP --cores 2 --placement unbound
  tynamo server --id 3 --data /tmp/t3 --initial-cluster $MAP --cores 2 --placement unbound
  redis-cli -c -p 7001 SET k v

Three machines (one host each, the same ports everywhere):
  tynamo server --id 1 --data /var/lib/tynamo \\
    --initial-cluster 1=10.0.0.1:7101/10.0.0.1:7001,2=10.0.0.2:7101/10.0.0.2:7001,3=10.0.0.3:7101/10.0.0.3:7001

A host added to a running cluster (no --initial-cluster; it learns the cluster from any host,
keeps what it learnt in its data directory, and restarts from it alone):
  tynamo server --id 4 --data /var/lib/tynamo --peer-addr 10.0.0.4:7101 \\
    --client-addr 10.0.0.4:7001 --cores 2 --join 10.0.0.1:7001
  tynamo ctl --cluster 10.0.0.1:7001 join 4=10.0.0.4:7101,10.0.0.4:7001,2

A config file holds the same settings under the flags' names (without the dashes; '-' or '_'):
  # tynamo.toml
  id = 1
  data = \"/var/lib/tynamo\"
  initial-cluster = \"1=10.0.0.1:7101/10.0.0.1:7001,2=10.0.0.2:7101/10.0.0.2:7001,3=10.0.0.3:7101/10.0.0.3:7001\"
  cores = 2
  election-ms = 1000
  tynamo server --config tynamo.toml --election-ms 500   # flags after --config win over it";

#[derive(Args, Clone)]
#[command(args_override_self = true, after_help = SERVER_HELP)]
struct ServerArgs {
    /// A TOML file whose keys are these flags' names (`id = 1`, `initial-cluster = "..."`);
    /// flags given after it on the command line win. See the example below.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// This host's id in --initial-cluster (required).
    #[arg(long)]
    id: Option<u64>,
    /// Data directory: one WAL and snapshot directory per group (required).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Core 0's client address (core c: port + c). Must match this host's entry in the map.
    #[arg(long)]
    client_addr: Option<SocketAddr>,
    /// Core 0's peer address (core c: port + c). Must match this host's entry in the map.
    #[arg(long)]
    peer_addr: Option<SocketAddr>,
    /// Every host: `id=peer_addr[/client_addr],...` (core 0's addresses); without
    /// `/client_addr` the client port is the peer port - 100. Without this flag (and without
    /// --join) the server is a single-host cluster at --peer-addr/--client-addr.
    #[arg(long)]
    initial_cluster: Option<String>,
    /// Join a running cluster through any of its hosts (`HOST:CLIENT_PORT`), instead of
    /// --initial-cluster; needs --peer-addr and --client-addr. Add the host with `tynamo ctl
    /// join` (before or after). A restart needs nothing but the data directory.
    #[arg(long, value_name = "HOST:PORT")]
    join: Option<String>,
    /// Executors (one group each); default: all CPUs.
    #[arg(long)]
    cores: Option<u16>,
    /// auto, pinned or unbound.
    #[arg(long)]
    placement: Option<String>,
    #[arg(long)]
    tick_ms: Option<u64>,
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    #[arg(long)]
    election_ms: Option<u64>,
    /// AppendEntries in flight per follower.
    #[arg(long)]
    window: Option<usize>,
    /// Entries per AppendEntries.
    #[arg(long)]
    batch_entries: Option<usize>,
    /// safe (ReadIndex) or lease.
    #[arg(long)]
    read_mode: Option<String>,
    /// Shards the key space is cut into (fixed at cluster creation; default 64).
    #[arg(long)]
    shard_count: Option<u16>,
    /// Log bytes applied between snapshots.
    #[arg(long)]
    snapshot_log_bytes: Option<u64>,
    /// WAL segment size (a multiple of 4096, at least 16 MiB; default 64 MiB).
    #[arg(long)]
    segment_bytes: Option<u64>,
    /// glommio registered I/O memory per core (within RLIMIT_MEMLOCK; default 1 MiB).
    #[arg(long)]
    io_memory_bytes: Option<usize>,
}

#[derive(Args)]
struct DemoArgs {
    /// Data directory (default: a temporary directory removed on exit).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Client port of host 1 core 0; host h uses base + 10 * (h - 1), peers base + 100.
    #[arg(long, default_value_t = 7001)]
    base_port: u16,
    #[arg(long, default_value_t = 2)]
    cores: u16,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let argv = match expand_config_file(argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("tynamo: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(argv);
    match cli.command {
        Cmd::Server(args) => match server_config(*args) {
            Ok(cfg) => match tynamo::node::run(cfg) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tynamo: {e}");
                    ExitCode::from(1)
                }
            },
            Err(e) => {
                eprintln!("tynamo: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::Demo(args) => demo(args),
        Cmd::Ctl(args) => ctl(args),
    }
}

/// `server --config F ...` becomes `server <flags from F> ...`: the file's keys are the flags'
/// names, and flags given later (on the command line) override them.
fn expand_config_file(argv: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let Some(at) = argv.iter().position(|a| a == "--config") else {
        return Ok(argv);
    };
    let Some(path) = argv.get(at + 1).map(PathBuf::from) else {
        return Ok(argv);
    };
    let file_err = |why: String| ConfigError::File {
        path: path.clone(),
        why,
    };
    let text = std::fs::read_to_string(&path).map_err(|e| file_err(e.to_string()))?;
    let doc: toml_edit::DocumentMut = text.parse().map_err(|e| file_err(format!("{e}")))?;
    let mut flags = Vec::new();
    for (key, item) in doc.iter() {
        let value = if let Some(s) = item.as_str() {
            s.to_string()
        } else if let Some(n) = item.as_integer() {
            n.to_string()
        } else if let Some(b) = item.as_bool() {
            b.to_string()
        } else {
            return Err(file_err(format!(
                "key {key}: expected a string, an integer or a boolean"
            )));
        };
        flags.push(format!("--{}", key.replace('_', "-")));
        flags.push(value);
    }
    let mut out: Vec<String> = argv[..at].to_vec();
    out.extend(flags);
    out.extend(argv[at + 2..].iter().cloned());
    Ok(out)
}

fn server_config(a: ServerArgs) -> Result<ServerConfig, ConfigError> {
    let missing = |flag: &str| ConfigError::Invalid(format!("--{flag} is required"));
    let id = a.id.ok_or_else(|| missing("id"))?;
    let data = a.data.ok_or_else(|| missing("data"))?;
    if a.join.is_some() && a.initial_cluster.is_some() {
        return Err(ConfigError::Invalid(
            "--join and --initial-cluster exclude each other: a joining host learns the \
             cluster from the host it joins through"
                .into(),
        ));
    }
    let hosts = match &a.initial_cluster {
        Some(text) => parse_initial_cluster(text)?,
        None if a.join.is_some() => {
            let peer = a
                .peer_addr
                .ok_or_else(|| missing("peer-addr (with --join)"))?;
            let client = a
                .client_addr
                .ok_or_else(|| missing("client-addr (with --join)"))?;
            vec![HostAddrs { id, peer, client }]
        }
        None => {
            // A single-host cluster from this host's own addresses.
            let peer = a.peer_addr.ok_or_else(|| missing("initial-cluster"))?;
            let client = a.client_addr.ok_or_else(|| missing("client-addr"))?;
            vec![HostAddrs { id, peer, client }]
        }
    };
    let cores = match a.cores {
        Some(c) => c,
        None => std::thread::available_parallelism().map_or(1, |n| n.get() as u16),
    };
    let mut hosts = hosts;
    if let Some(me) = hosts.iter_mut().find(|h| h.id == id) {
        if let Some(p) = a.peer_addr {
            if p != me.peer {
                return Err(ConfigError::Invalid(format!(
                    "--peer-addr {p} differs from host {id}'s entry {} in --initial-cluster",
                    me.peer
                )));
            }
        }
        if let Some(c) = a.client_addr {
            me.client = c;
        }
    }
    let mut cfg = ServerConfig::new(id, data, hosts, cores);
    if let Some(p) = a.placement {
        cfg.placement = match p.as_str() {
            "auto" => PlacementMode::Auto,
            "pinned" => PlacementMode::Pinned,
            "unbound" => PlacementMode::Unbound,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "--placement {other}: expected auto, pinned or unbound"
                )))
            }
        };
    }
    cfg.join = a.join;
    if let Some(m) = a.read_mode {
        cfg.read_mode = match m.as_str() {
            "safe" => ReadMode::Safe,
            "lease" => ReadMode::Lease,
            other => {
                return Err(ConfigError::Invalid(format!(
                    "--read-mode {other}: expected safe or lease"
                )))
            }
        };
    }
    macro_rules! set {
        ($($field:ident <- $arg:ident),*) => { $( if let Some(v) = a.$arg { cfg.$field = v; } )* };
    }
    set!(tick_ms <- tick_ms, heartbeat_ms <- heartbeat_ms, election_ms <- election_ms,
         inflight_msgs_max <- window, entries_per_msg_max <- batch_entries,
         shard_count <- shard_count, snapshot_log_bytes <- snapshot_log_bytes,
         segment_bytes <- segment_bytes, io_memory_bytes <- io_memory_bytes);
    cfg.validate()?;
    Ok(cfg)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn demo(a: DemoArgs) -> ExitCode {
    let (tmp, data) = match a.data {
        Some(d) => (None, d),
        None => match tempfile::Builder::new().prefix("tynamo-demo-").tempdir() {
            Ok(t) => {
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
            Err(e) => {
                eprintln!("tynamo demo: cannot create a temporary directory: {e}");
                return ExitCode::from(1);
            }
        },
    };
    let ip = [127, 0, 0, 1];
    let hosts: Vec<HostAddrs> = (1..=3u16)
        .map(|h| {
            let client = a.base_port + 10 * (h - 1);
            HostAddrs {
                id: u64::from(h),
                peer: SocketAddr::from((ip, client + 100)),
                client: SocketAddr::from((ip, client)),
            }
        })
        .collect();
    let map = format_initial_cluster(&hosts);
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("tynamo demo: cannot find my own executable: {e}");
            return ExitCode::from(1);
        }
    };
    // SAFETY: `on_signal` only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let mut children: Vec<Child> = Vec::new();
    // SAFETY: getpid(2) has no preconditions.
    let demo_pid = unsafe { libc::getpid() };
    for h in &hosts {
        let mut command = Command::new(&exe);
        // SAFETY: the closure runs in the forked child before exec, where only
        // async-signal-safe calls are allowed: prctl(2) and getppid(2) are plain system calls,
        // and the closure touches no lock and allocates nothing (the error is built from an
        // errno value). PR_SET_PDEATHSIG sends SIGTERM to the host when the thread that forked
        // it ends; that is this main thread, which lives until the demo exits, so a demo killed
        // with SIGKILL takes its hosts with it. The getppid check covers a demo that died
        // between fork and prctl (the signal would then never come).
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != demo_pid {
                    return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let spawned = command
            .args(["server", "--id", &h.id.to_string()])
            .arg("--data")
            .arg(data.join(format!("host-{}", h.id)))
            .args(["--initial-cluster", &map])
            .args(["--cores", &a.cores.to_string(), "--placement", "unbound"])
            // Own process group: Ctrl-C reaches the demo only, which stops the hosts in order.
            .process_group(0)
            .spawn();
        match spawned {
            Ok(c) => children.push(c),
            Err(e) => {
                eprintln!("tynamo demo: cannot start host {}: {e}", h.id);
                stop(&mut children);
                return ExitCode::from(1);
            }
        }
    }
    println!(
        "TynamoDB demo: 3 hosts x {} cores, data in {}",
        a.cores,
        data.display()
    );
    // Only client addresses are printed as ip:port (tools such as tynamo-bench --local take every
    // ip:port printed as a client seed, the first one first).
    for h in &hosts {
        let addrs: Vec<String> = (0..a.cores)
            .map(|c| SocketAddr::new(h.client.ip(), h.client.port() + c).to_string())
            .collect();
        println!(
            "  host {}: clients {} (peer ports {}-{})",
            h.id,
            addrs.join(" "),
            h.peer.port(),
            h.peer.port() + a.cores - 1
        );
    }
    let p = a.base_port;
    println!("Try:\n  redis-cli -c -p {p} SET k v\n  redis-cli -c -p {p} GET k\n  redis-cli -c -p {p} CLUSTER SLOTS");
    println!("  redis-benchmark --cluster -p {p} -t set,get -n 100000 -c 64 -d 256");
    println!("Ctrl-C stops the cluster.");
    let mut code = ExitCode::SUCCESS;
    while !STOP.load(Ordering::SeqCst) {
        for (i, c) in children.iter_mut().enumerate() {
            if let Ok(Some(status)) = c.try_wait() {
                eprintln!("tynamo demo: host {} exited: {status}", i + 1);
                STOP.store(true, Ordering::SeqCst);
                code = ExitCode::from(1);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("stopping...");
    stop(&mut children);
    drop(tmp);
    code
}

fn stop(children: &mut [Child]) {
    for c in children.iter() {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    for c in children.iter_mut() {
        let _ = c.wait();
    }
}

/// `ID=PEER_ADDR,CLIENT_ADDR,CORES` -> the four `TYNAMO.CTL JOIN` arguments.
fn join_args(spec: &str) -> Result<[String; 4], String> {
    let bad = || format!("host {spec:?}: expected ID=PEER_ADDR,CLIENT_ADDR,CORES");
    let (id, rest) = spec.split_once('=').ok_or_else(bad)?;
    let parts: Vec<&str> = rest.split(',').map(str::trim).collect();
    let [peer, client, cores] = parts[..] else {
        return Err(bad());
    };
    let id: u64 = id.trim().parse().map_err(|_| bad())?;
    let peer: SocketAddr = peer.parse().map_err(|_| bad())?;
    let client: SocketAddr = client.parse().map_err(|_| bad())?;
    let cores: u16 = cores.parse().map_err(|_| bad())?;
    Ok([
        id.to_string(),
        peer.to_string(),
        client.to_string(),
        cores.to_string(),
    ])
}

fn ctl(a: CtlArgs) -> ExitCode {
    use tynamo::client::ctl;
    // One change per invocation: a fresh session, seq 1, re-sent unchanged on every retry.
    let session = || {
        let client_id = rand::random::<u64>() | 1;
        vec![client_id.to_string(), "1".to_string()]
    };
    let args: Vec<String> = match &a.op {
        CtlOp::Query { num } => {
            let mut v = vec!["QUERY".to_string()];
            v.extend(num.map(|n| n.to_string()));
            v
        }
        CtlOp::Status => vec!["STATUS".into()],
        CtlOp::Join { hosts } => {
            let mut v = vec!["JOIN".to_string()];
            v.extend(session());
            for h in hosts {
                match join_args(h) {
                    Ok(four) => v.extend(four),
                    Err(e) => {
                        eprintln!("tynamo ctl: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            v
        }
        CtlOp::Leave { hosts } => {
            let mut v = vec!["LEAVE".to_string()];
            v.extend(session());
            v.extend(hosts.iter().map(u64::to_string));
            v
        }
        CtlOp::Move { shard, group } => {
            let mut v = vec!["MOVE".to_string()];
            v.extend(session());
            v.extend([shard.to_string(), group.to_string()]);
            v
        }
    };
    let timeout = Duration::from_millis(a.timeout_ms);
    if matches!(a.op, CtlOp::Status) {
        return match ctl::status(&a.cluster, timeout) {
            Ok(doc) if a.json => {
                println!("{doc}");
                ExitCode::SUCCESS
            }
            Ok(doc) => {
                print!("{}", ctl::status_table(&doc));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tynamo ctl: {e}");
                ExitCode::from(1)
            }
        };
    }
    let reply = match ctl::call(&a.cluster, &args, timeout) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tynamo ctl: {e}");
            return ExitCode::from(1);
        }
    };
    match &a.op {
        CtlOp::Query { .. } | CtlOp::Status => {
            let doc = match ctl::json_reply(&reply, &a.cluster) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("tynamo ctl: {e}");
                    return ExitCode::from(1);
                }
            };
            if a.json {
                println!("{doc}");
            } else if matches!(a.op, CtlOp::Status) {
                print!("{}", ctl::status_table(&doc));
            } else {
                print!("{}", ctl::config_table(&doc));
            }
        }
        _ => match reply {
            tynamo::resp::frame::Frame::Integer(num) if a.json => println!("{{\"num\":{num}}}"),
            tynamo::resp::frame::Frame::Integer(num) => println!("configuration {num}"),
            other => {
                eprintln!("tynamo ctl: unexpected reply {other}");
                return ExitCode::from(1);
            }
        },
    }
    ExitCode::SUCCESS
}
