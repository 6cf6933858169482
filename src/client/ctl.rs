//! The operator client behind `tynamo ctl`: sends one `TYNAMO.CTL` request (see
//! `node::admin`) to any host, follows `-REDIRECT` to the controller leader, retries
//! `-TRYAGAIN` and unreachable hosts until a deadline, and renders the JSON answers as tables.
//!
//! `status` asks the controller leader (STATUS), then every host of the configuration for its
//! group replicas (GROUPS), and shows each group as its leader's replica reports it: a group's
//! replicas live on several hosts, none of which sees every group.
//!
//! Blocking std sockets: a command-line tool sends one request and exits, so an executor
//! would only add start-up cost. A change carries a random client id and seq 1, re-sent
//! unchanged on every retry, so the controller applies it once however often it is sent.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde_json::Value;

use crate::resp::frame::{decode, Frame, Limits};

use super::error::resolve;

/// Redirects followed for one request (a leader change may add one or two).
pub const REDIRECTS_MAX: u32 = 8;
/// Bytes of one reply (a status of a large cluster is a few hundred KiB).
const REPLY_BYTES_MAX: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("{addr}: {message}")]
    Server { addr: SocketAddr, message: String },
    #[error("no answer within {timeout:?}; last: {last}")]
    Timeout { timeout: Duration, last: String },
    #[error("more than {REDIRECTS_MAX} redirects; last to {addr}")]
    Redirects { addr: SocketAddr },
    #[error("{addr}: unexpected reply: {reply}")]
    Unexpected { addr: SocketAddr, reply: String },
    #[error("cannot resolve {0}")]
    Resolve(String),
}

/// Sends `args` (after `TYNAMO.CTL`) to `cluster` and returns the final reply, an error reply
/// from the controller included as `CtlError::Server`.
pub fn call(cluster: &str, args: &[String], timeout: Duration) -> Result<Frame, CtlError> {
    let mut addr = resolve(cluster).map_err(|_| CtlError::Resolve(cluster.to_string()))?;
    let deadline = Instant::now() + timeout;
    let mut redirects = 0;
    let mut backoff = Duration::from_millis(20);
    let mut last = String::from("nothing sent");
    while Instant::now() < deadline {
        match call_once(addr, args, deadline) {
            Ok(Frame::Error(e)) => {
                let text = String::from_utf8_lossy(&e).into_owned();
                if let Some(to) = text.strip_prefix("REDIRECT ") {
                    redirects += 1;
                    if redirects > REDIRECTS_MAX {
                        return Err(CtlError::Redirects { addr });
                    }
                    addr = to
                        .split_whitespace()
                        .next()
                        .and_then(|a| a.parse().ok())
                        .ok_or_else(|| CtlError::Unexpected {
                            addr,
                            reply: text.clone(),
                        })?;
                    continue;
                }
                if !text.starts_with("TRYAGAIN") {
                    return Err(CtlError::Server {
                        addr,
                        message: text,
                    });
                }
                last = format!("{addr}: {text}");
            }
            Ok(frame) => return Ok(frame),
            Err(e) => last = format!("{addr}: {e}"),
        }
        std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
        backoff = (backoff * 2).min(Duration::from_millis(500));
    }
    Err(CtlError::Timeout { timeout, last })
}

fn call_once(addr: SocketAddr, args: &[String], deadline: Instant) -> std::io::Result<Frame> {
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let mut stream = TcpStream::connect_timeout(&addr, left)?;
    stream.set_read_timeout(Some(left))?;
    stream.set_write_timeout(Some(left))?;
    let mut out = Vec::new();
    let _ = write!(out, "*{}\r\n$10\r\nTYNAMO.CTL\r\n", args.len() + 1);
    for a in args {
        let _ = write!(out, "${}\r\n{a}\r\n", a.len());
    }
    stream.write_all(&out)?;
    let limits = Limits {
        bulk_bytes_max: REPLY_BYTES_MAX,
        ..Limits::DEFAULT
    };
    let mut buf = BytesMut::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        match decode(&mut buf, &limits) {
            Ok(Some(frame)) => return Ok(frame),
            Ok(None) => {}
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Longest wait for one host's GROUPS answer in `status` (a host that is down costs this).
const HOST_GROUPS_TIMEOUT: Duration = Duration::from_secs(2);

/// `tynamo ctl status`: the controller leader's STATUS completed with every host's replicas
/// (`hosts`), each group's figures from its leader's replica, the transfers in flight at the
/// groups' leaders, the groups still running although no configuration names them
/// (`retiring`), and whether the cluster is `settled` (every group at the latest configuration
/// with nothing in flight, no retiring group, every host answered).
pub fn status(cluster: &str, timeout: Duration) -> Result<Value, CtlError> {
    let reply = call(cluster, &["STATUS".to_string()], timeout)?;
    let mut doc = json_reply(&reply, cluster)?;
    let mut hosts = Vec::new();
    let listed = doc["config"]["hosts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let departed = doc["departed_hosts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let addrs = listed
        .iter()
        .map(|h| (h, false))
        .chain(departed.iter().map(|h| (h, true)));
    for (h, left) in addrs {
        let id = h["id"].clone();
        let client = h["addr"]
            .as_str()
            .and_then(|a| a.split_once('/'))
            .map(|(_, c)| c.to_string());
        let answer = client.as_deref().map(|addr| {
            call(
                addr,
                &["GROUPS".to_string()],
                timeout.min(HOST_GROUPS_TIMEOUT),
            )
            .and_then(|f| json_reply(&f, addr))
        });
        hosts.push(match answer {
            Some(Ok(g)) => serde_json::json!({
                "id": id, "left": left, "reachable": true, "replicas": g["replicas"],
                "removed": g["removed"],
            }),
            Some(Err(e)) => serde_json::json!({
                "id": id, "left": left, "reachable": false, "error": e.to_string(),
            }),
            None => serde_json::json!({
                "id": id, "left": left, "reachable": false, "error": "no client address",
            }),
        });
    }
    merge_hosts(&mut doc, hosts);
    Ok(doc)
}

/// Completes a STATUS document with every host's GROUPS answer (see [`status`]).
pub fn merge_hosts(doc: &mut Value, hosts: Vec<Value>) {
    // Every replica any host reports, with its host.
    let mut replicas: Vec<(Value, &Value)> = Vec::new();
    for h in &hosts {
        for r in h["replicas"].as_array().into_iter().flatten() {
            replicas.push((h["id"].clone(), r));
        }
    }
    // A group's figures come from its leader's replica (the highest term if several claim it,
    // as one may not have heard of its successor yet), else from the most advanced one.
    let best = |group: &Value| {
        replicas
            .iter()
            .filter(|(_, r)| &r["group"] == group)
            .max_by_key(|(_, r)| {
                (
                    r["role"] == "leader",
                    r["term"].as_u64().unwrap_or(0),
                    r["applied"].as_u64().unwrap_or(0),
                )
            })
            .map(|(_, r)| *r)
    };
    let num = doc["config"]["num"].clone();
    // A host that left may be stopped already: only the hosts of the configuration must answer.
    let mut settled = hosts
        .iter()
        .all(|h| h["reachable"] == true || h["left"] == true);
    let mut transfers = Vec::new();
    let mut add_transfers = |r: &Value| {
        for t in r["in_flight"].as_array().into_iter().flatten() {
            transfers.push(serde_json::json!({
                "group": r["group"], "shard": t["shard"], "state": t["state"],
                "peer_group": t["peer_group"], "config_num": r["config_num"],
            }));
        }
    };
    if let Some(groups) = doc["groups"].as_array_mut() {
        for g in groups.iter_mut() {
            match best(&g["id"]) {
                Some(r) => {
                    g["leader"] = r["leader_host"].clone();
                    g["leader_core"] = r["leader_core"].clone();
                    for k in ["term", "commit", "applied", "config_num"] {
                        g[k] = r[k].clone();
                    }
                    settled &= r["role"] == "leader"
                        && r["config_num"] == num
                        && r["in_flight"].as_array().map_or(true, Vec::is_empty);
                    add_transfers(r);
                }
                None => settled = false,
            }
        }
    }
    let listed: Vec<Value> = doc["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| g["id"].clone())
        .collect();
    let mut retiring: Vec<Value> = Vec::new();
    for (_, r) in &replicas {
        if !listed.contains(&r["group"]) && !retiring.contains(&r["group"]) {
            retiring.push(r["group"].clone());
        }
    }
    let retiring: Vec<Value> = retiring
        .into_iter()
        .map(|id| {
            if let Some(r) = best(&id) {
                add_transfers(r);
            }
            let on: Vec<Value> = replicas
                .iter()
                .filter(|(_, r)| r["group"] == id)
                .map(|(host, r)| {
                    serde_json::json!({"host": host, "core": r["core"], "role": r["role"],
                    "applied": r["applied"], "shards": r["serving"]})
                })
                .collect();
            serde_json::json!({"id": id, "replicas": on})
        })
        .collect();
    settled &= retiring.is_empty();
    doc["transfers"] = Value::Array(transfers);
    doc["retiring"] = Value::Array(retiring);
    doc["hosts"] = Value::Array(hosts);
    doc["settled"] = Value::Bool(settled);
}

/// The JSON document of a QUERY or STATUS reply.
pub fn json_reply(frame: &Frame, addr: &str) -> Result<Value, CtlError> {
    let unexpected = || CtlError::Unexpected {
        addr: resolve(addr).unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
        reply: format!("{frame}"),
    };
    let bytes = frame.as_bytes().ok_or_else(unexpected)?;
    serde_json::from_slice(bytes).map_err(|_| unexpected())
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Lays out rows under a header with columns padded to their widest cell.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (c, w) in cells.zip(&widths) {
            let _ = write!(text, "{c:<w$}  ");
        }
        let _ = writeln!(out, "{}", text.trim_end());
    };
    line(out, &mut header.iter().copied());
    for row in rows {
        line(out, &mut row.iter().map(String::as_str));
    }
}

/// Shard numbers as ranges: `0-31,40`.
fn ranges(shards: &[Value]) -> String {
    let nums: Vec<u64> = shards.iter().filter_map(Value::as_u64).collect();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < nums.len() {
        let mut j = i;
        while j + 1 < nums.len() && nums[j + 1] == nums[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            nums[i].to_string()
        } else {
            format!("{}-{}", nums[i], nums[j])
        });
        i = j + 1;
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

fn replicas(v: &Value) -> String {
    v.as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| format!("{}:{}", cell(&r["host"]), cell(&r["core"])))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// A configuration (QUERY) as tables.
pub fn config_table(c: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "configuration {}  (shards {}, replication {}, controller {})",
        cell(&c["num"]),
        cell(&c["shard_count"]),
        cell(&c["replication"]),
        replicas(&c["controller"])
    );
    hosts_table(&mut out, c);
    let groups: Vec<Vec<String>> = c["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            vec![
                cell(&g["id"]),
                cell(&g["created_in"]),
                replicas(&g["replicas"]),
                g["shards"].as_array().map_or(0, Vec::len).to_string(),
                ranges(g["shards"].as_array().map_or(&[], Vec::as_slice)),
            ]
        })
        .collect();
    out.push('\n');
    table(
        &mut out,
        &[
            "GROUP",
            "CREATED",
            "REPLICAS(host:core)",
            "SHARDS",
            "SHARD IDS",
        ],
        &groups,
    );
    out
}

/// The hosts of a configuration document, as a table after a blank line.
fn hosts_table(out: &mut String, c: &Value) {
    let hosts: Vec<Vec<String>> = c["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| vec![cell(&h["id"]), cell(&h["cores"]), cell(&h["addr"])])
        .collect();
    out.push('\n');
    table(out, &["HOST", "CORES", "PEER/CLIENT"], &hosts);
}

/// A STATUS reply as tables.
pub fn status_table(s: &Value) -> String {
    let c = &s["config"];
    let ctl = &s["controller"];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "configuration {}  controller leader: host {} (term {}, commit {}, applied {})",
        cell(&c["num"]),
        cell(&ctl["leader"]),
        cell(&ctl["term"]),
        cell(&ctl["commit"]),
        cell(&ctl["applied"]),
    );
    hosts_table(&mut out, c);
    let groups: Vec<Vec<String>> = s["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            vec![
                cell(&g["id"]),
                cell(&g["leader"]),
                cell(&g["term"]),
                cell(&g["commit"]),
                cell(&g["applied"]),
                cell(&g["shards"]),
                replicas(&g["replicas"]),
            ]
        })
        .collect();
    out.push('\n');
    table(
        &mut out,
        &[
            "GROUP",
            "LEADER",
            "TERM",
            "COMMIT",
            "APPLIED",
            "SHARDS",
            "REPLICAS(host:core)",
        ],
        &groups,
    );
    let transfers: Vec<Vec<String>> = s["transfers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            vec![
                cell(&t["group"]),
                cell(&t["shard"]),
                cell(&t["state"]),
                cell(&t["peer_group"]),
                cell(&t["config_num"]),
            ]
        })
        .collect();
    let _ = writeln!(
        out,
        "\ntransfers in flight: {}  (as each group's leader applied them)",
        if transfers.is_empty() {
            "none".to_string()
        } else {
            transfers.len().to_string()
        },
    );
    if !transfers.is_empty() {
        table(
            &mut out,
            &["GROUP", "SHARD", "STATE", "PEER GROUP", "CONFIG"],
            &transfers,
        );
    }
    let retiring: Vec<String> = s["retiring"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| cell(&g["id"]))
        .collect();
    if !retiring.is_empty() {
        let _ = writeln!(
            out,
            "retiring groups (handing their shards over): {}",
            retiring.join(",")
        );
    }
    let hosts: Vec<Vec<String>> = s["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            let replicas: Vec<String> = h["replicas"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    format!(
                        "{}@{}:{}",
                        cell(&r["group"]),
                        cell(&r["core"]),
                        cell(&r["role"])
                    )
                })
                .collect();
            let state = if h["reachable"] == true {
                if replicas.is_empty() {
                    "-".to_string()
                } else {
                    replicas.join(" ")
                }
            } else {
                format!("unreachable: {}", cell(&h["error"]))
            };
            let id = if h["left"] == true {
                format!("{} (left)", cell(&h["id"]))
            } else {
                cell(&h["id"])
            };
            vec![id, state]
        })
        .collect();
    if !hosts.is_empty() {
        out.push('\n');
        table(&mut out, &["HOST", "REPLICAS(group@core:role)"], &hosts);
    }
    if let Some(settled) = s["settled"].as_bool() {
        let _ = writeln!(
            out,
            "\n{}",
            if settled {
                "settled: every group at the latest configuration, nothing in flight"
            } else {
                "not settled: transfers in flight, groups retiring or hosts unreachable"
            }
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lists_the_transfers_in_flight() {
        let status = serde_json::json!({
            "seen_from": 2,
            "config": {"num": 5, "hosts": []},
            "controller": {"leader": 1, "term": 3, "commit": 9, "applied": 9},
            "groups": [],
            "transfers": [
                {"group": 2, "shard": 7, "state": "importing", "peer_group": 1, "config_num": 5},
            ],
        });
        let text = status_table(&status);
        assert!(
            text.contains("transfers in flight: 1  (as each group's leader applied them)"),
            "{text}"
        );
        assert!(text.contains("GROUP  SHARD  STATE      PEER GROUP  CONFIG\n2      7      importing  1           5"), "{text}");
        let idle = serde_json::json!({"seen_from": 1, "transfers": []});
        assert!(status_table(&idle).contains("transfers in flight: none"));
    }

    #[test]
    fn status_takes_each_group_from_its_leader_and_names_retiring_groups() {
        let status = || {
            serde_json::json!({
                "seen_from": 1,
                "config": {"num": 7, "hosts": []},
                "controller": {"leader": 1},
                "groups": [{"id": 1}, {"id": 2}],
                "transfers": [],
            })
        };
        let replica = |group: u64, core: u64, role: &str, term: u64, num: u64, flight: bool| {
            let in_flight = if flight {
                serde_json::json!([{"shard": 9, "state": "exporting", "peer_group": 1}])
            } else {
                serde_json::json!([])
            };
            serde_json::json!({"group": group, "core": core, "role": role, "term": term,
                "commit": term * 10, "applied": term * 10, "config_num": num, "leader_host": 2,
                "leader_core": core, "serving": 4, "in_flight": in_flight})
        };
        let host = |id: u64, replicas: Vec<Value>| serde_json::json!({"id": id, "reachable": true, "replicas": replicas, "removed": []});
        // Group 1 led on host 2 (host 1's replica still thinks it leads at an older term);
        // group 3 is retiring from host 1 core 1 with shard 9 on its way to group 1.
        let mut doc = status();
        merge_hosts(
            &mut doc,
            vec![
                host(
                    1,
                    vec![
                        replica(1, 0, "leader", 3, 6, false),
                        replica(3, 1, "leader", 2, 7, true),
                    ],
                ),
                host(
                    2,
                    vec![
                        replica(1, 0, "leader", 4, 7, false),
                        replica(2, 1, "leader", 2, 7, false),
                    ],
                ),
            ],
        );
        assert_eq!(doc["groups"][0]["term"], 4, "{doc}");
        assert_eq!(doc["groups"][0]["config_num"], 7);
        assert_eq!(doc["retiring"][0]["id"], 3);
        assert_eq!(doc["transfers"][0]["group"], 3);
        assert_eq!(doc["transfers"][0]["state"], "exporting");
        assert_eq!(doc["settled"], false);
        let text = status_table(&doc);
        assert!(
            text.contains("retiring groups (handing their shards over): 3"),
            "{text}"
        );
        assert!(text.contains("1@0:leader 3@1:leader"), "{text}");
        // Group 3 gone, every group's leader at configuration 7: settled.
        let mut doc = status();
        merge_hosts(
            &mut doc,
            vec![
                host(1, vec![replica(1, 0, "follower", 4, 7, false)]),
                host(
                    2,
                    vec![
                        replica(1, 0, "leader", 4, 7, false),
                        replica(2, 1, "leader", 2, 7, false),
                    ],
                ),
            ],
        );
        assert_eq!(doc["settled"], true, "{doc}");
        assert!(status_table(&doc).contains("settled: every group"));
        // A host that does not answer: not settled, and said so.
        let mut doc = status();
        merge_hosts(
            &mut doc,
            vec![
                host(
                    2,
                    vec![
                        replica(1, 0, "leader", 4, 7, false),
                        replica(2, 1, "leader", 2, 7, false),
                    ],
                ),
                serde_json::json!({"id": 5, "reachable": false, "error": "connection refused"}),
            ],
        );
        assert_eq!(doc["settled"], false);
        assert!(status_table(&doc).contains("unreachable: connection refused"));
        // A host that left: stopped is fine; still running a replica of a retiring group is
        // not settled (it hands shards over), and says so.
        let both = || {
            host(
                2,
                vec![
                    replica(1, 0, "leader", 4, 7, false),
                    replica(2, 1, "leader", 2, 7, false),
                ],
            )
        };
        let mut doc = status();
        let stopped = serde_json::json!({"id": 4, "left": true, "reachable": false, "error": "x"});
        merge_hosts(&mut doc, vec![both(), stopped]);
        assert_eq!(doc["settled"], true, "{doc}");
        let mut doc = status();
        let running = serde_json::json!({"id": 4, "left": true, "reachable": true,
            "replicas": [replica(3, 0, "follower", 2, 7, false)]});
        merge_hosts(&mut doc, vec![both(), running]);
        assert_eq!(doc["settled"], false, "{doc}");
        assert_eq!(doc["retiring"][0]["id"], 3);
        let text = status_table(&doc);
        assert!(text.contains("4 (left)  3@0:follower"), "{text}");
    }

    #[test]
    fn shard_lists_print_as_ranges_and_tables_align() {
        let v: Vec<Value> = [0, 1, 2, 5, 7, 8].iter().map(|&n| Value::from(n)).collect();
        assert_eq!(ranges(&v), "0-2,5,7-8");
        assert_eq!(ranges(&[]), "-");
        let mut out = String::new();
        table(
            &mut out,
            &["A", "LONGER"],
            &[vec!["wide cell".into(), "x".into()]],
        );
        assert_eq!(out, "A          LONGER\nwide cell  x\n");
    }
}
