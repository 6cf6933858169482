//! The operator client behind `tynamo ctl`: sends one `TYNAMO.CTL` request (see
//! `node::admin`) to any host, follows `-REDIRECT` to the controller leader, retries
//! `-TRYAGAIN` and unreachable hosts until a deadline, and renders the JSON answers as tables.
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
        "\ntransfers in flight: {}  (group state as seen from host {})",
        if transfers.is_empty() {
            "none".to_string()
        } else {
            transfers.len().to_string()
        },
        cell(&s["seen_from"])
    );
    if !transfers.is_empty() {
        table(
            &mut out,
            &["GROUP", "SHARD", "STATE", "PEER GROUP", "CONFIG"],
            &transfers,
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
            text.contains("transfers in flight: 1  (group state as seen from host 2)"),
            "{text}"
        );
        assert!(text.contains("GROUP  SHARD  STATE      PEER GROUP  CONFIG\n2      7      importing  1           5"), "{text}");
        let idle = serde_json::json!({"seen_from": 1, "transfers": []});
        assert!(status_table(&idle).contains("transfers in flight: none"));
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
