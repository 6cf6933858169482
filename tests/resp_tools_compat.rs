//! The server-side protocol layer (request parsing, typed commands, error wording, cluster
//! replies) driven by the real tools: a three-node fake cluster built only from `tynamo::resp`
//! (and a HashMap for data) must satisfy `redis-cli -c` and `redis-benchmark --cluster`, and
//! answer every malformed command with the very bytes Redis 7 answers.

#[path = "resp_redis_support.rs"]
mod support;

use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command as Process;
use std::sync::{Arc, Mutex};
use support::{redis_available, RedisServer};
use tynamo::resp::command::{ClusterCommand, Command, CommandQuery, Request};
use tynamo::resp::frame::{self, Limits, Protocol};
use tynamo::resp::reply::{self, NodeInfo, ServerHello, SlotRange, Topology};
use tynamo::shard::slots::key_slot;

type Store = Arc<Mutex<HashMap<Bytes, Bytes>>>;

struct FakeNode {
    me: usize,
    topology: Arc<Topology>,
    store: Store,
}

impl FakeNode {
    fn owner(&self, key: &[u8]) -> Option<(u16, &NodeInfo)> {
        let slot = key_slot(key);
        let range = self
            .topology
            .ranges
            .iter()
            .find(|r| r.start <= slot && slot <= r.end)?;
        Some((slot, &range.nodes[0]))
    }

    fn id(&self) -> &str {
        &self.topology.ranges[self.me].nodes[0].id
    }

    /// Answers one request; returns false when the connection should close.
    fn answer(&self, args: &[Bytes], proto: &mut Protocol, out: &mut BytesMut) -> bool {
        let request = match Request::parse(args) {
            Ok(r) => r,
            Err(e) => {
                frame::put_error(out, e.to_string().as_bytes());
                return true;
            }
        };
        if let Some(key) = request.command.first_key() {
            if let Some((slot, owner)) = self.owner(key) {
                if owner.id != self.id() {
                    reply::put_moved(out, slot, owner.addr);
                    return true;
                }
            }
        }
        let mut store = self.store.lock().unwrap();
        match request.command {
            Command::Ping(None) => frame::put_simple(out, b"PONG"),
            Command::Ping(Some(m)) | Command::Echo(m) => frame::put_bulk(out, &m),
            Command::Hello { protocol, .. } => {
                *proto = protocol.unwrap_or(*proto);
                let hello = ServerHello {
                    version: "7.0.0",
                    connection_id: 1,
                    mode: "cluster",
                    role: "master",
                };
                reply::put_hello(out, &hello, *proto);
            }
            Command::Command(CommandQuery::Count) => frame::put_integer(out, 0),
            Command::Command(_) => frame::put_array_len(out, 0),
            Command::Get(k) => match store.get(&k) {
                Some(v) => frame::put_bulk(out, v),
                None => frame::put_null(out, *proto),
            },
            Command::Set(s) => {
                store.insert(s.key, s.value);
                frame::put_simple(out, b"OK");
            }
            Command::Cluster(ClusterCommand::Slots) => {
                reply::put_cluster_slots(out, &self.topology, *proto)
            }
            Command::Cluster(ClusterCommand::Shards) => {
                reply::put_cluster_shards(out, &self.topology, *proto)
            }
            Command::Cluster(ClusterCommand::Nodes) => reply::put_text(
                out,
                &reply::cluster_nodes_text(&self.topology, self.id()),
                *proto,
            ),
            Command::Cluster(ClusterCommand::Info) => {
                reply::put_text(out, &reply::cluster_info_text(&self.topology), *proto)
            }
            Command::Cluster(ClusterCommand::MyId) => frame::put_bulk(out, self.id().as_bytes()),
            Command::Cluster(ClusterCommand::KeySlot(k)) => {
                frame::put_integer(out, i64::from(key_slot(&k)))
            }
            Command::Info(_) => {
                let info = format!(
                    "# Server\r\nredis_version:7.0.0\r\n\r\n{}",
                    reply::INFO_CLUSTER_SECTION
                );
                reply::put_text(out, &info, *proto)
            }
            Command::Quit => {
                frame::put_simple(out, b"OK");
                return false;
            }
            _ => frame::put_simple(out, b"OK"),
        }
        true
    }
}

fn serve(mut stream: TcpStream, node: Arc<FakeNode>) {
    let (mut buf, mut args, mut out) = (BytesMut::new(), Vec::new(), BytesMut::new());
    let mut chunk = [0u8; 16384];
    let mut proto = Protocol::Resp2;
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        out.clear();
        let mut open = true;
        loop {
            match frame::decode_request(&mut buf, &Limits::DEFAULT, &mut args) {
                Ok(true) => {
                    if !node.answer(&args, &mut proto, &mut out) {
                        open = false;
                        break;
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    frame::put_error(&mut out, format!("ERR Protocol error: {e}").as_bytes());
                    open = false;
                    break;
                }
            }
        }
        if stream.write_all(&out).is_err() || !open {
            return;
        }
    }
}

/// Three fake nodes splitting the slots as `redis-cli --cluster create` does.
fn fake_cluster() -> (Vec<SocketAddr>, Store) {
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    let bounds = [(0u16, 5460u16), (5461, 10922), (10923, 16383)];
    let topology = Arc::new(Topology {
        ranges: (0..3)
            .map(|i| SlotRange {
                start: bounds[i].0,
                end: bounds[i].1,
                nodes: vec![NodeInfo {
                    id: NodeInfo::id_from(0xa0 + i as u128),
                    addr: addrs[i],
                }],
            })
            .collect(),
        epoch: 1,
    });
    let store: Store = Arc::default();
    for (me, listener) in listeners.into_iter().enumerate() {
        let node = Arc::new(FakeNode {
            me,
            topology: topology.clone(),
            store: store.clone(),
        });
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let node = node.clone();
                std::thread::spawn(move || serve(stream, node));
            }
        });
    }
    (addrs, store)
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Process::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).trim_end().to_string()
}

#[test]
fn redis_cli_follows_our_moved_and_reads_our_cluster_replies() {
    if !redis_available() {
        return;
    }
    let (addrs, store) = fake_cluster();
    let port = addrs[0].port();
    // "foo" hashes to slot 12182, owned by the third node: node 0 answers MOVED.
    assert_eq!(
        cli(port, &["GET", "foo"]),
        format!("MOVED 12182 {}", addrs[2])
    );
    assert_eq!(cli(port, &["-c", "SET", "foo", "bar"]), "OK");
    assert_eq!(cli(port, &["-c", "GET", "foo"]), "bar");
    assert_eq!(
        store.lock().unwrap().get(&b"foo"[..]),
        Some(&Bytes::from_static(b"bar"))
    );
    assert_eq!(cli(port, &["CLUSTER", "KEYSLOT", "foo"]), "12182");
    // redis-cli's cluster tooling parses CLUSTER NODES and checks slot coverage.
    let check = Process::new("redis-cli")
        .args(["--cluster", "check", &addrs[1].to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(text.contains("[OK] All 16384 slots covered."), "{text}");
    // RESP3 through HELLO 3.
    assert_eq!(
        cli(port, &["-3", "CLUSTER", "INFO"]).lines().next(),
        Some("cluster_state:ok")
    );
}

#[test]
fn redis_benchmark_runs_against_our_cluster_replies() {
    if !redis_available() {
        return;
    }
    let (addrs, store) = fake_cluster();
    let out = Process::new("redis-benchmark")
        .args([
            "--cluster",
            "-p",
            &addrs[1].port().to_string(),
            "-t",
            "set,get",
            "-n",
            "3000",
            "-c",
            "6",
            "-q",
        ])
        .output()
        .expect("redis-benchmark");
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("Cluster has 3 master nodes"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("SET: ") && l.contains("requests per second")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("GET: ") && l.contains("requests per second")),
        "{text}"
    );
    // Every node got its share: redis-benchmark used our slot map and hash tags.
    let keys = store.lock().unwrap().len();
    assert!(keys >= 3, "only {keys} keys written");
}

#[test]
fn inline_commands_and_garbage_get_redis_answers() {
    let (addrs, _) = fake_cluster();
    let mut s = TcpStream::connect(addrs[0]).unwrap();
    s.write_all(b"PING\r\nECHO \"a b\"\r\n*1\r\n:5\r\n")
        .unwrap();
    let mut got = Vec::new();
    // The server closes after the protocol error, so read to the end.
    s.read_to_end(&mut got).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&got),
        "+PONG\r\n$3\r\na b\r\n-ERR Protocol error: expected '$', got ':'\r\n"
    );
}

#[test]
fn malformed_commands_get_the_same_bytes_as_from_redis() {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start(&[]);
    let (addrs, _) = fake_cluster();
    let cases: &[&[&str]] = &[
        &["FOO", "a", "b"],
        &["GET"],
        &["GET", "a", "b"],
        &["SET", "k"],
        &["SET", "k", "v", "NX", "XX"],
        &["SET", "k", "v", "EX", "x"],
        &["SET", "k", "v", "PX", "0"],
        &["SET", "k", "v", "EX", "-5"],
        &["SET", "k", "v", "EX", "10", "PX", "10"],
        &["SET", "k", "v", "EX", "x", "NX", "XX"],
        &["SET", "k", "v", "KEEPTTL", "EX", "10"],
        &["SET", "k", "v", "EX", "10", "KEEPTTL"],
        &["SET", "k", "v", "EX", "9223372036854776"],
        &[
            "SET", "k", "v", "NX", "NX", "GET", "GET", "EX", "5", "EX", "0",
        ],
        &["SET", "k", "v", "BOGUS"],
        &["MSET", "a"],
        &["MSET", "a", "1", "b"],
        &["PING", "a", "b"],
        &["HELLO", "4"],
        &["HELLO", "x"],
        &["HELLO", "3", "FOO"],
        &["CLUSTER"],
        &["CLUSTER", "KEYSLOT"],
        &["CLUSTER", "bogus"],
        &["READONLY", "x"],
        &["COMMAND", "COUNT", "x"],
        &["COMMAND", "bogus"],
        &["ECHO"],
        &["INCR"],
        &["APPEND", "k"],
        &["DEL"],
        &["EXISTS"],
        &["MGET"],
    ];
    let raw = |addr: SocketAddr, args: &[&str]| -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut wire = BytesMut::new();
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        frame::put_request(&mut wire, &args);
        s.write_all(&wire).unwrap();
        let mut buf = BytesMut::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(len) = frame::check(&buf, &Limits::DEFAULT).unwrap() {
                return String::from_utf8_lossy(&buf[..len]).into_owned();
            }
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "closed before replying to {args:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    // Only refusals are compared: a valid command's effect is the server's business, not ours.
    for case in cases {
        assert_eq!(raw(addrs[0], case), raw(redis.addr(), case), "{case:?}");
    }
}
