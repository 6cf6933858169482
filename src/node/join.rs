//! A host joining a running cluster (`tynamo server --join SEED`), the way an etcd or TiKV
//! operator adds a member: the new process is pointed at the cluster, and the cluster is told
//! about the new member, in either order.
//!
//! ```text
//! tynamo server --id 4 --data /var/lib/tynamo --peer-addr 10.0.0.4:7101 \
//!     --client-addr 10.0.0.4:7001 --cores 2 --join 10.0.0.1:7001
//! tynamo ctl --cluster 10.0.0.1:7001 join 4=10.0.0.4:7101,10.0.0.4:7001,2
//! ```
//!
//! On its first start the host asks the seed (any host's client address) for the latest
//! configuration (`TYNAMO.MIGRATE LATEST`) and keeps it in `<data>/joined`: where the
//! controller runs and how to reach it, the shard count and the replication. It runs no
//! static-map group and no controller replica; its cores create the replicas the
//! configurations place on them once `tynamo ctl join` has added the host (`replica::walk`).
//! Restarted, the host reads `<data>/joined` and its replicas' directories: it needs neither the
//! seed nor `--join` (both are accepted and ignored), so a joined host comes back from its data
//! directory alone. `--initial-cluster` and a joined data directory exclude each other, as do
//! `--join` and the data directory of an initial host.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::BytesMut;

use crate::controller::Configuration;
use crate::resp::frame::{decode, put_request, Frame, Limits};

use super::config::ServerConfig;
use super::control::host_addr_text;
use super::executor::NodeError;
use super::replica::{frame_record, unframe_record, write_durably};

/// `<data>/joined`: the configuration the host learnt when it joined.
pub const JOIN_FILE: &str = "joined";
const JOIN_MAGIC: [u8; 4] = *b"TYNJ";
/// A configuration of the largest cluster the controller allows is well under this.
const JOIN_CONFIG_BYTES_MAX: usize = 16 << 20;
/// How long a first start keeps asking the seed before giving up.
const SEED_TIMEOUT: Duration = Duration::from_secs(60);
/// One request to the seed (connect, send, answer).
const SEED_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Decides whether this host runs as a joined host and, if so, returns the configuration it
/// joined with (read from the data directory, or learnt from the seed and written there).
/// Sets `cfg.joined` and takes the cluster's shard count.
pub fn prepare(cfg: &mut ServerConfig) -> Result<Option<Configuration>, NodeError> {
    let path = cfg.data_dir.join(JOIN_FILE);
    let config = match std::fs::read(&path) {
        Ok(bytes) => {
            if cfg.join.is_none() && cfg.hosts.len() > 1 {
                return Err(NodeError::Join(format!(
                    "{} belongs to a host that joined the cluster: start it without \
                     --initial-cluster",
                    cfg.data_dir.display()
                )));
            }
            decode_join_file(&bytes)
                .map_err(|e| NodeError::Join(format!("{}: {e}", path.display())))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let Some(seed) = cfg.join.clone() else {
                return Ok(None);
            };
            if holds_initial_host_data(&cfg.data_dir) {
                return Err(NodeError::Join(format!(
                    "{} holds the data of a host of --initial-cluster; a joining host starts \
                     with an empty data directory",
                    cfg.data_dir.display()
                )));
            }
            let config = fetch_latest(&seed, cfg.cluster_id)?;
            std::fs::create_dir_all(&cfg.data_dir)
                .map_err(|e| NodeError::Join(format!("create {}: {e}", cfg.data_dir.display())))?;
            write_durably(&path, &encode_join_file(&config)).map_err(NodeError::Join)?;
            config
        }
        Err(e) => return Err(NodeError::Join(format!("read {}: {e}", path.display()))),
    };
    check_joined(cfg, &config)?;
    cfg.joined = true;
    cfg.shard_count = config.shard_count();
    Ok(Some(config))
}

/// What the host must agree on with the configuration it joined with.
fn check_joined(cfg: &ServerConfig, config: &Configuration) -> Result<(), NodeError> {
    if config.controller.is_empty() {
        return Err(NodeError::Join(format!(
            "configuration {} names no controller yet",
            config.num
        )));
    }
    if config.controller.iter().any(|s| s.host == cfg.id) {
        return Err(NodeError::Join(format!(
            "host {} runs a controller replica: it is a host of --initial-cluster",
            cfg.id
        )));
    }
    let me = cfg
        .me()
        .ok_or_else(|| NodeError::Join(format!("host {} has no addresses", cfg.id)))?;
    if let Some(h) = config.hosts.get(&cfg.id) {
        let addr = host_addr_text(me);
        if h.addr != addr {
            return Err(NodeError::Join(format!(
                "the cluster knows host {} at {}, this host is at {addr}",
                cfg.id, h.addr
            )));
        }
    }
    Ok(())
}

fn holds_initial_host_data(data_dir: &Path) -> bool {
    std::fs::read_dir(data_dir).is_ok_and(|entries| {
        entries.filter_map(Result::ok).any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name == "controller" || name == "core-0.walked" || name.starts_with("group-")
        })
    })
}

pub fn encode_join_file(config: &Configuration) -> Vec<u8> {
    frame_record(JOIN_MAGIC, &config.to_bytes())
}

pub fn decode_join_file(bytes: &[u8]) -> Result<Configuration, String> {
    let payload = unframe_record(JOIN_MAGIC, bytes, JOIN_CONFIG_BYTES_MAX)?;
    Configuration::decode(payload).map_err(|e| format!("configuration: {e}"))
}

/// Asks `seed` for the latest configuration until it answers one that names a controller, or
/// [`SEED_TIMEOUT`] passes.
fn fetch_latest(seed: &str, cluster_id: u64) -> Result<Configuration, NodeError> {
    let deadline = Instant::now() + SEED_TIMEOUT;
    let mut said = String::new();
    loop {
        let why = match request_latest(seed, cluster_id) {
            Ok(config) if !config.controller.is_empty() => return Ok(config),
            Ok(config) => format!("configuration {} names no controller yet", config.num),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(NodeError::Join(format!(
                "the seed {seed} gave no configuration within {SEED_TIMEOUT:?}: {why}"
            )));
        }
        if why != said {
            eprintln!("tynamo: joining through {seed}: {why} (retrying)");
            said = why;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn request_latest(seed: &str, cluster_id: u64) -> Result<Configuration, String> {
    let addr = seed
        .to_socket_addrs()
        .map_err(|e| format!("resolve {seed}: {e}"))?
        .next()
        .ok_or_else(|| format!("{seed} resolves to no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, SEED_REQUEST_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let io = |e: std::io::Error| format!("{addr}: {e}");
    s.set_read_timeout(Some(SEED_REQUEST_TIMEOUT)).map_err(io)?;
    s.set_write_timeout(Some(SEED_REQUEST_TIMEOUT))
        .map_err(io)?;
    let id = cluster_id.to_string();
    let mut out = BytesMut::new();
    put_request(&mut out, &[b"TYNAMO.MIGRATE", b"LATEST", id.as_bytes()]);
    s.write_all(&out).map_err(io)?;
    let limits = Limits {
        bulk_bytes_max: JOIN_CONFIG_BYTES_MAX,
        ..Limits::DEFAULT
    };
    let mut buf = BytesMut::new();
    let mut chunk = vec![0u8; 64 << 10];
    let frame = loop {
        if let Some(f) = decode(&mut buf, &limits).map_err(|e| format!("{addr}: {e}"))? {
            break f;
        }
        let n = s.read(&mut chunk).map_err(io)?;
        if n == 0 {
            return Err(format!("{addr} closed the connection before answering"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    match frame {
        Frame::Bulk(bytes) => {
            Configuration::decode(&bytes).map_err(|e| format!("configuration from {addr}: {e}"))
        }
        other => Err(format!(
            "{addr} answered {}",
            other.as_error().map_or_else(
                || format!("{other:?}"),
                |e| String::from_utf8_lossy(e).into_owned()
            )
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::{Reply, StateMachine};
    use crate::node::config::{parse_initial_cluster, HostAddrs};
    use crate::node::control::ControlPlan;

    fn cluster_config() -> Configuration {
        let map = "1=127.0.0.1:7101/127.0.0.1:7001,2=127.0.0.1:7111/127.0.0.1:7011,3=127.0.0.1:7121/127.0.0.1:7021";
        let cfg = ServerConfig::new(1, "/x".into(), parse_initial_cluster(map).unwrap(), 2);
        let plan = ControlPlan::new(&cfg);
        let mut sm = StateMachine::new(plan.settings.clone()).unwrap();
        for (i, c) in plan.bootstrap.iter().enumerate() {
            let reply = sm.apply(i as u64 + 1, &c.encode());
            assert!(matches!(reply, Some(Reply::Ok { .. })));
        }
        sm.latest().clone()
    }

    fn joiner(dir: &Path, seed: Option<&str>) -> ServerConfig {
        let me = HostAddrs {
            id: 4,
            peer: "127.0.0.1:7131".parse().unwrap(),
            client: "127.0.0.1:7031".parse().unwrap(),
        };
        let mut cfg = ServerConfig::new(4, dir.to_path_buf(), vec![me], 2);
        cfg.join = seed.map(str::to_string);
        cfg
    }

    #[test]
    fn the_join_file_round_trips_and_refuses_corruption() {
        let config = cluster_config();
        let bytes = encode_join_file(&config);
        assert_eq!(decode_join_file(&bytes), Ok(config));
        for i in [0, 4, 9, 20, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(decode_join_file(&bad).is_err(), "byte {i}");
        }
        assert!(decode_join_file(&bytes[..bytes.len() - 1]).is_err());
    }

    #[test]
    fn a_joined_data_directory_restarts_alone_and_excludes_the_other_modes() {
        let dir = tempfile::tempdir().unwrap();
        let config = cluster_config();
        std::fs::write(dir.path().join(JOIN_FILE), encode_join_file(&config)).unwrap();
        // No seed, no --join: the data directory says it all.
        let mut cfg = joiner(dir.path(), None);
        cfg.shard_count = 7;
        let got = prepare(&mut cfg).unwrap().unwrap();
        assert_eq!(got.num, config.num);
        assert!(cfg.joined && !cfg.initial_host());
        assert_eq!(
            cfg.shard_count,
            config.shard_count(),
            "the cluster's shard count"
        );
        // With --initial-cluster: refused, naming why.
        let mut wrong = joiner(dir.path(), None);
        wrong.hosts =
            parse_initial_cluster("4=127.0.0.1:7131/127.0.0.1:7031,1=127.0.0.1:7101").unwrap();
        let e = prepare(&mut wrong).unwrap_err().to_string();
        assert!(e.contains("without --initial-cluster"), "{e}");
        // A host the cluster knows at another address: refused.
        let mut joined = config.clone();
        joined.hosts.insert(
            4,
            crate::controller::Host {
                cores: 2,
                addr: "127.0.0.1:9999/127.0.0.1:9998".into(),
            },
        );
        std::fs::write(dir.path().join(JOIN_FILE), encode_join_file(&joined)).unwrap();
        let e = prepare(&mut joiner(dir.path(), None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("knows host 4 at 127.0.0.1:9999"), "{e}");
        // --join on an initial host's data directory: refused before asking anyone.
        let initial = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(initial.path().join("group-0")).unwrap();
        let e = prepare(&mut joiner(initial.path(), Some("127.0.0.1:1")))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("holds the data of a host of --initial-cluster"),
            "{e}"
        );
        // Neither: an initial host.
        let empty = tempfile::tempdir().unwrap();
        let mut cfg = joiner(empty.path(), None);
        assert!(prepare(&mut cfg).unwrap().is_none());
        assert!(cfg.initial_host());
    }
}
