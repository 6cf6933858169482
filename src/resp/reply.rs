//! Replies whose exact shape tools depend on: the Redis Cluster topology commands
//! (`CLUSTER SLOTS`, `SHARDS`, `NODES`, `INFO`), redirections (`-MOVED`, `-ASK`, `-TRYAGAIN`)
//! and `HELLO`. The server fills a [`Topology`] from its configuration; these functions write
//! the bytes Redis 7.0 writes for the same topology, so redis-cli `-c`, redis-benchmark
//! `--cluster`, every cluster client and our own `client` module read them unchanged.
//!
//! A TynamoDB "node" here is one core's listener (each core has its own port), and the node
//! listed first for a slot range is the range's Raft leader (the Redis "master").

use super::frame::{put_array_len, put_bulk, put_error, put_integer, put_map_len, Protocol};
use bytes::{BufMut, BytesMut};
use std::fmt::Write as _;
use std::net::SocketAddr;

/// Redis node ids are 40 hex characters; tools check the length.
pub const NODE_ID_LEN: usize = 40;

/// One listener a client can talk to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// 40 lower-case hex characters, stable for the life of the listener.
    pub id: String,
    pub addr: SocketAddr,
}

impl NodeInfo {
    /// A node id derived from a stable number (e.g. host id and core), zero-padded hex.
    pub fn id_from(number: u128) -> String {
        format!("{number:040x}")
    }
}

/// A contiguous slot range and who serves it: leader first, then followers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRange {
    pub start: u16,
    pub end: u16,
    pub nodes: Vec<NodeInfo>,
}

/// The cluster as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Topology {
    pub ranges: Vec<SlotRange>,
    /// The configuration number (Redis' epoch).
    pub epoch: u64,
}

/// The `INFO` section cluster tools require: `redis-cli --cluster` refuses a node whose INFO
/// lacks `cluster_enabled:1` ("is not configured as a cluster node").
pub const INFO_CLUSTER_SECTION: &str = "# Cluster\r\ncluster_enabled:1\r\n";

/// `-MOVED <slot> <ip>:<port>`: the slot is served elsewhere; the client updates its map.
pub fn put_moved(out: &mut BytesMut, slot: u16, owner: SocketAddr) {
    put_redirect(out, "MOVED", slot, owner);
}

/// `-ASK <slot> <ip>:<port>`: during a migration, ask that node once (after `ASKING`).
pub fn put_ask(out: &mut BytesMut, slot: u16, owner: SocketAddr) {
    put_redirect(out, "ASK", slot, owner);
}

fn put_redirect(out: &mut BytesMut, kind: &str, slot: u16, owner: SocketAddr) {
    // Formatted straight into the output (BytesMut is fmt::Write): no allocation per redirect.
    let _ = write!(out, "-{kind} {slot} {owner}\r\n");
}

/// `-TRYAGAIN ...`: the request cannot be served now (e.g. multi-key during a migration).
pub fn put_tryagain(out: &mut BytesMut) {
    put_error(
        out,
        b"TRYAGAIN Multiple keys request during rehashing of slot",
    );
}

/// `-CLUSTERDOWN ...`: no leader serves the slot right now (election in progress).
pub fn put_clusterdown(out: &mut BytesMut) {
    put_error(out, b"CLUSTERDOWN The cluster is down");
}

fn put_ip(out: &mut BytesMut, addr: SocketAddr) {
    // The longest IPv6 text is 45 bytes: format on the stack, then write the bulk string.
    let mut text = [0u8; 64];
    let mut cursor = std::io::Cursor::new(&mut text[..]);
    let _ = std::io::Write::write_fmt(&mut cursor, format_args!("{}", addr.ip()));
    let len = cursor.position() as usize;
    put_bulk(out, &text[..len]);
}

/// `CLUSTER SLOTS` (Redis 7): per range `[start, end, [ip, port, id, {}], ...]`.
pub fn put_cluster_slots(out: &mut BytesMut, topology: &Topology, protocol: Protocol) {
    put_array_len(out, topology.ranges.len());
    for range in &topology.ranges {
        put_array_len(out, 2 + range.nodes.len());
        put_integer(out, i64::from(range.start));
        put_integer(out, i64::from(range.end));
        for node in &range.nodes {
            put_array_len(out, 4);
            put_ip(out, node.addr);
            put_integer(out, i64::from(node.addr.port()));
            put_bulk(out, node.id.as_bytes());
            // Additional networking metadata (hostname): none.
            put_map_len(out, 0, protocol);
        }
    }
}

/// `CLUSTER SHARDS` (Redis 7): per range a map `slots`, `nodes` (each node a map).
pub fn put_cluster_shards(out: &mut BytesMut, topology: &Topology, protocol: Protocol) {
    put_array_len(out, topology.ranges.len());
    for range in &topology.ranges {
        put_map_len(out, 2, protocol);
        put_bulk(out, b"slots");
        put_array_len(out, 2);
        put_integer(out, i64::from(range.start));
        put_integer(out, i64::from(range.end));
        put_bulk(out, b"nodes");
        put_array_len(out, range.nodes.len());
        for (i, node) in range.nodes.iter().enumerate() {
            put_map_len(out, 7, protocol);
            put_bulk(out, b"id");
            put_bulk(out, node.id.as_bytes());
            put_bulk(out, b"port");
            put_integer(out, i64::from(node.addr.port()));
            put_bulk(out, b"ip");
            put_ip(out, node.addr);
            put_bulk(out, b"endpoint");
            put_ip(out, node.addr);
            put_bulk(out, b"role");
            put_bulk(out, if i == 0 { b"master" } else { b"replica" });
            put_bulk(out, b"replication-offset");
            put_integer(out, 0);
            put_bulk(out, b"health");
            put_bulk(out, b"online");
        }
    }
}

/// `CLUSTER NODES` text: one line per node,
/// `<id> <ip:port@bus-port> <flags> <master-id|-> <ping> <pong> <epoch> connected <slots...>`.
/// A node that leads several ranges lists them all on its line; followers name the leader of
/// their first range as their master. We have no cluster bus: the bus port printed is the
/// client port + 10000, as Redis' default, so that parsers splitting on `@` are satisfied.
pub fn cluster_nodes_text(topology: &Topology, myself: &str) -> String {
    struct Line<'a> {
        node: &'a NodeInfo,
        master_of: Vec<(u16, u16)>,
        replica_of: Option<&'a str>,
    }
    let mut lines: Vec<Line<'_>> = Vec::new();
    for range in &topology.ranges {
        for (i, node) in range.nodes.iter().enumerate() {
            let at = match lines.iter().position(|l| l.node.id == node.id) {
                Some(at) => at,
                None => {
                    lines.push(Line {
                        node,
                        master_of: Vec::new(),
                        replica_of: None,
                    });
                    lines.len() - 1
                }
            };
            if i == 0 {
                lines[at].master_of.push((range.start, range.end));
            } else if lines[at].replica_of.is_none() {
                lines[at].replica_of = Some(range.nodes[0].id.as_str());
            }
        }
    }
    let mut text = String::new();
    for line in &lines {
        let node = line.node;
        let me = if node.id == myself { "myself," } else { "" };
        let master = !line.master_of.is_empty() || line.replica_of.is_none();
        let role = if master { "master" } else { "slave" };
        let master_id = if master {
            "-"
        } else {
            line.replica_of.unwrap_or("-")
        };
        let bus_port = u32::from(node.addr.port()) + 10000;
        let _ = write!(
            text,
            "{} {}:{}@{} {me}{role} {master_id} 0 0 {} connected",
            node.id,
            node.addr.ip(),
            node.addr.port(),
            bus_port,
            topology.epoch
        );
        for &(start, end) in &line.master_of {
            if start == end {
                let _ = write!(text, " {start}");
            } else {
                let _ = write!(text, " {start}-{end}");
            }
        }
        text.push('\n');
    }
    text
}

/// `CLUSTER INFO` text (the fields clients look at).
pub fn cluster_info_text(topology: &Topology) -> String {
    let assigned: u32 = topology
        .ranges
        .iter()
        .map(|r| u32::from(r.end) - u32::from(r.start) + 1)
        .sum();
    let state = if assigned == 16384 { "ok" } else { "fail" };
    let mut ids: Vec<&str> = topology
        .ranges
        .iter()
        .flat_map(|r| r.nodes.iter().map(|n| n.id.as_str()))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let masters = topology.ranges.len();
    format!(
        "cluster_state:{state}\r\ncluster_slots_assigned:{assigned}\r\ncluster_slots_ok:{assigned}\r\n\
         cluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:{}\r\ncluster_size:{masters}\r\n\
         cluster_current_epoch:{epoch}\r\ncluster_my_epoch:{epoch}\r\n",
        ids.len(),
        epoch = topology.epoch
    )
}

/// A text reply: bulk string in RESP2, verbatim `txt:` string in RESP3 (as Redis sends
/// `CLUSTER NODES`, `CLUSTER INFO` and `INFO`).
pub fn put_text(out: &mut BytesMut, text: &str, protocol: Protocol) {
    match protocol {
        Protocol::Resp2 => put_bulk(out, text.as_bytes()),
        Protocol::Resp3 => {
            out.put_u8(b'=');
            let mut n = [0u8; 20];
            out.put_slice(super::frame::format_i64((text.len() + 4) as i64, &mut n));
            out.put_slice(b"\r\ntxt:");
            out.put_slice(text.as_bytes());
            out.put_slice(b"\r\n");
        }
    }
}

/// What `HELLO` reports about the server.
#[derive(Debug, Clone)]
pub struct ServerHello<'a> {
    pub version: &'a str,
    /// This connection's id.
    pub connection_id: u64,
    /// `cluster` or `standalone`.
    pub mode: &'a str,
    /// `master` (leader) or `replica`.
    pub role: &'a str,
}

/// The `HELLO` reply, in the protocol the connection now speaks.
pub fn put_hello(out: &mut BytesMut, hello: &ServerHello<'_>, protocol: Protocol) {
    put_map_len(out, 7, protocol);
    put_bulk(out, b"server");
    put_bulk(out, b"tynamo");
    put_bulk(out, b"version");
    put_bulk(out, hello.version.as_bytes());
    put_bulk(out, b"proto");
    put_integer(out, if protocol == Protocol::Resp3 { 3 } else { 2 });
    put_bulk(out, b"id");
    put_integer(out, i64::try_from(hello.connection_id).unwrap_or(i64::MAX));
    put_bulk(out, b"mode");
    put_bulk(out, hello.mode.as_bytes());
    put_bulk(out, b"role");
    put_bulk(out, hello.role.as_bytes());
    put_bulk(out, b"modules");
    put_array_len(out, 0);
}

/// `CONFIG GET` of anything: an empty result (redis-benchmark asks for `save` and
/// `appendonly` and carries on without them).
pub fn put_empty_config(out: &mut BytesMut, protocol: Protocol) {
    put_map_len(out, 0, protocol);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::cluster::parse_cluster_slots;
    use crate::resp::frame::{decode, Frame, Limits};

    fn node(n: u128, port: u16) -> NodeInfo {
        NodeInfo {
            id: NodeInfo::id_from(n),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn topology() -> Topology {
        Topology {
            ranges: vec![
                SlotRange {
                    start: 0,
                    end: 8191,
                    nodes: vec![node(1, 7001), node(2, 7002)],
                },
                SlotRange {
                    start: 8192,
                    end: 16383,
                    nodes: vec![node(2, 7002), node(1, 7001)],
                },
            ],
            epoch: 5,
        }
    }

    #[test]
    fn cluster_slots_has_redis_7_bytes_and_our_client_reads_it() {
        let mut out = BytesMut::new();
        let one = Topology {
            ranges: vec![SlotRange {
                start: 0,
                end: 5460,
                nodes: vec![node(0xab, 41001)],
            }],
            epoch: 1,
        };
        put_cluster_slots(&mut out, &one, Protocol::Resp2);
        // Byte for byte what Redis 7.0.15 answered for a one-master range (id aside).
        let id = NodeInfo::id_from(0xab);
        let want = format!(
            "*1\r\n*3\r\n:0\r\n:5460\r\n*4\r\n$9\r\n127.0.0.1\r\n:41001\r\n$40\r\n{id}\r\n*0\r\n"
        );
        assert_eq!(std::str::from_utf8(&out).unwrap(), want);

        let mut out = BytesMut::new();
        put_cluster_slots(&mut out, &topology(), Protocol::Resp3);
        let reply = decode(&mut out, &Limits::DEFAULT).unwrap().unwrap();
        let asked = SocketAddr::from(([127, 0, 0, 1], 7001));
        let ranges = parse_cluster_slots(&reply, asked).unwrap();
        assert_eq!(
            ranges,
            vec![
                (0, 8191, node(1, 7001).addr),
                (8192, 16383, node(2, 7002).addr)
            ]
        );
    }

    #[test]
    fn cluster_shards_is_a_map_per_shard() {
        let mut out = BytesMut::new();
        put_cluster_shards(&mut out, &topology(), Protocol::Resp3);
        let Some(Frame::Array(shards)) = decode(&mut out, &Limits::DEFAULT).unwrap() else {
            panic!()
        };
        assert_eq!(shards.len(), 2);
        let Frame::Map(fields) = &shards[1] else {
            panic!("{:?}", shards[1])
        };
        assert_eq!(
            fields[0].1,
            Frame::Array(vec![Frame::Integer(8192), Frame::Integer(16383)])
        );
        let Frame::Array(nodes) = &fields[1].1 else {
            panic!()
        };
        let Frame::Map(leader) = &nodes[0] else {
            panic!()
        };
        assert_eq!(leader[1].1, Frame::Integer(7002));
        assert_eq!(leader[4].1, Frame::Bulk("master".into()));
    }

    #[test]
    fn cluster_nodes_lists_each_node_once_with_its_ranges() {
        let text = cluster_nodes_text(&topology(), &NodeInfo::id_from(2));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let id1 = NodeInfo::id_from(1);
        assert_eq!(
            lines[0],
            format!("{id1} 127.0.0.1:7001@17001 master - 0 0 5 connected 0-8191")
        );
        assert!(
            lines[1].ends_with(" 127.0.0.1:7002@17002 myself,master - 0 0 5 connected 8192-16383"),
            "{}",
            lines[1]
        );
        assert!(cluster_info_text(&topology())
            .starts_with("cluster_state:ok\r\ncluster_slots_assigned:16384\r\n"));
    }

    #[test]
    fn redirections_are_worded_as_redis() {
        let mut out = BytesMut::new();
        put_moved(&mut out, 12182, SocketAddr::from(([127, 0, 0, 1], 41003)));
        put_ask(&mut out, 1, "[::1]:7000".parse().unwrap());
        assert_eq!(
            &out[..],
            &b"-MOVED 12182 127.0.0.1:41003\r\n-ASK 1 [::1]:7000\r\n"[..]
        );
    }

    #[test]
    fn text_and_hello_replies_decode_in_both_protocols() {
        for protocol in [Protocol::Resp2, Protocol::Resp3] {
            let mut out = BytesMut::new();
            put_text(&mut out, "a:1\r\n", protocol);
            let hello = ServerHello {
                version: "0.1.0",
                connection_id: 9,
                mode: "cluster",
                role: "master",
            };
            put_hello(&mut out, &hello, protocol);
            let text = decode(&mut out, &Limits::DEFAULT).unwrap().unwrap();
            match protocol {
                Protocol::Resp2 => assert_eq!(text, Frame::Bulk("a:1\r\n".into())),
                Protocol::Resp3 => assert_eq!(text, Frame::Verbatim("txt:a:1\r\n".into())),
            }
            let hello = decode(&mut out, &Limits::DEFAULT).unwrap().unwrap();
            let proto = if protocol == Protocol::Resp3 { 3 } else { 2 };
            match hello {
                Frame::Map(pairs) => assert_eq!(pairs[2].1, Frame::Integer(proto)),
                Frame::Array(items) => assert_eq!(items[5], Frame::Integer(proto)),
                other => panic!("{other:?}"),
            }
        }
    }
}
