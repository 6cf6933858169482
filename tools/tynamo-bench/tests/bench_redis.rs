//! tynamo-bench end to end: against real Redis (standalone and Redis Cluster), a server that
//! lies (serves stale values), one that answers garbage, and an unreachable one.

mod common;
#[path = "../../../tests/resp_redis_support.rs"]
mod support;

use bytes::{Bytes, BytesMut};
use common::{result_fields, text};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use support::{redis_available, RedisCluster, RedisServer};
use tynamo::resp::frame::{self, Limits};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tynamo-bench"))
        .args(args)
        .output()
        .expect("run tynamo-bench")
}

#[test]
fn verified_run_against_redis_reports_every_request() {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]);
    let addr = format!("127.0.0.1:{}", redis.port);
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("summary.json");
    let plot = dir.path().join("latency.svg");
    let hgrm = dir.path().join("hgrm");
    let out = bench(&[
        "--server",
        &addr,
        "--requests",
        "5000",
        "--connections",
        "4",
        "--pipeline",
        "8",
        "--threads",
        "2",
        "--keys",
        "500",
        "--load",
        "--verify",
        "--workload",
        "a",
        "--dist",
        "zipfian",
        "--json",
        json.to_str().unwrap(),
        "--plot",
        plot.to_str().unwrap(),
        "--hgrm",
        hgrm.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let r = result_fields(&out);
    assert_eq!(r["ops"], "5000");
    assert_eq!(r["errors"], "0");
    assert_eq!(r["verify"], "ok");
    assert_eq!(r["misses"], "0", "every key was loaded");
    let (gets, sets): (u64, u64) = (r["get_ops"].parse().unwrap(), r["set_ops"].parse().unwrap());
    assert_eq!(gets + sets, 5000);
    // A 50/50 mix: far from either extreme.
    assert!(gets > 2000 && sets > 2000, "gets {gets} sets {sets}");
    for field in [
        "p50_us",
        "p90_us",
        "p99_us",
        "p999_us",
        "max_us",
        "get_p99_us",
        "set_max_us",
    ] {
        let v: u64 = r[field].parse().unwrap();
        assert!(v >= 1, "{field}={v}");
    }
    let stdout = text(&out.stdout);
    assert!(stdout.contains("       Value     Percentile TotalCount 1/(1-Percentile)"));
    assert!(stdout.contains("#[Mean    ="));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(summary["ops"], serde_json::json!(5000));
    assert_eq!(summary["verify"]["ok"], serde_json::json!(true));
    assert!(std::fs::read_to_string(hgrm.join("get.hgrm"))
        .unwrap()
        .contains("Percentile"));
    assert!(std::fs::read_to_string(hgrm.join("set.hgrm"))
        .unwrap()
        .contains("Percentile"));
    assert!(std::fs::read_to_string(&plot)
        .unwrap()
        .contains("<polyline"));
}

#[test]
fn cluster_aware_run_with_counters_and_an_open_loop_run() {
    if !redis_available() {
        return;
    }
    let cluster = RedisCluster::start();
    let seed = format!("127.0.0.1:{}", cluster.nodes[2].port);
    let out = bench(&[
        "--cluster",
        &seed,
        "--requests",
        "3000",
        "--connections",
        "3",
        "--pipeline",
        "16",
        "--keys",
        "300",
        "--load",
        "--verify",
        "--workload",
        "f",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let r = result_fields(&out);
    assert_eq!(
        (
            r["ops"].as_str(),
            r["errors"].as_str(),
            r["verify"].as_str()
        ),
        ("3000", "0", "ok")
    );
    assert!(r["incr_ops"].parse::<u64>().unwrap() > 1000);
    // Every node got keys: the run was routed by slot, not sent to the seed only.
    for n in &cluster.nodes {
        let size = support::redis_cli(n.port, &["DBSIZE"]);
        assert!(
            size.parse::<u64>().unwrap() > 50,
            "node {} holds {size} keys",
            n.port
        );
    }

    let out = bench(&[
        "--cluster",
        &seed,
        "--rate",
        "4000",
        "--requests",
        "400",
        "--connections",
        "2",
        "--workload",
        "c",
    ]);
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    let r = result_fields(&out);
    assert_eq!((r["ops"].as_str(), r["get_ops"].as_str()), ("400", "400"));
}

/// A RESP server that acknowledges every SET but keeps only the first value of each key, so
/// reads return stale data. Everything else it does not know is an unknown command, as Redis.
fn lying_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let store: Arc<Mutex<HashMap<Bytes, Bytes>>> = Arc::default();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let store = store.clone();
            std::thread::spawn(move || serve_lies(stream, &store));
        }
    });
    addr
}

fn serve_lies(mut s: TcpStream, store: &Mutex<HashMap<Bytes, Bytes>>) {
    let (mut buf, mut args, mut chunk, mut out) =
        (BytesMut::new(), Vec::new(), [0u8; 16384], BytesMut::new());
    loop {
        let n = match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        out.clear();
        while let Ok(true) = frame::decode_request(&mut buf, &Limits::DEFAULT, &mut args) {
            let name = args[0].to_ascii_uppercase();
            match name.as_slice() {
                b"SET" => {
                    store
                        .lock()
                        .unwrap()
                        .entry(args[1].clone())
                        .or_insert_with(|| args[2].clone());
                    frame::put_simple(&mut out, b"OK");
                }
                b"GET" => match store.lock().unwrap().get(&args[1]) {
                    Some(v) => frame::put_bulk(&mut out, v),
                    None => frame::put_null(&mut out, frame::Protocol::Resp2),
                },
                _ => frame::put_error(&mut out, b"ERR unknown command"),
            }
        }
        if s.write_all(&out).is_err() {
            return;
        }
    }
}

#[test]
fn a_server_serving_stale_values_fails_verification() {
    let addr = lying_server().to_string();
    let out = bench(&[
        "--server",
        &addr,
        "--requests",
        "2000",
        "--connections",
        "2",
        "--keys",
        "20",
        "--load",
        "--verify",
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let r = result_fields(&out);
    assert_eq!(r["verify"], "failed");
    assert!(r["mismatches"].parse::<u64>().unwrap() > 0);
    assert!(
        text(&out.stdout).contains("stale read: GET key"),
        "{}",
        text(&out.stdout)
    );
}

#[test]
fn an_unreachable_target_exits_2_with_a_clear_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    for target in ["--server", "--cluster"] {
        let out = bench(&[target, &addr, "--requests", "10"]);
        assert_eq!(out.status.code(), Some(2), "{target}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&format!("cannot connect to {addr}")),
            "{target}: {stderr}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn a_target_answering_garbage_exits_2_with_a_clear_error() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let mut b = [0u8; 1024];
                while let Ok(n) = s.read(&mut b) {
                    if n == 0 || s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").is_err() {
                        return;
                    }
                }
            });
        }
    });
    let out = bench(&["--server", &addr, "--requests", "10"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("answered garbage (Protocol error:"),
        "{stderr}"
    );
}

#[test]
fn every_workload_sends_its_mix_and_verifies() {
    if !redis_available() {
        return;
    }
    let redis = RedisServer::start(&[]);
    let addr = format!("127.0.0.1:{}", redis.port);
    /// (workload, extra args, operation types that must appear, that must not)
    type Case<'a> = (&'a str, &'a [&'a str], &'a [&'a str], &'a [&'a str]);
    let cases: &[Case<'_>] = &[
        (
            "b",
            &["--dist", "zipfian:0.5"],
            &["get", "set"],
            &["incr", "append"],
        ),
        ("c", &["--read-mode", "stale"], &["get"], &["set"]),
        ("d", &[], &["get", "set"], &["incr"]),
        ("write", &["--value-size", "10..300"], &["set"], &["get"]),
        (
            "f",
            &["--rmw", "append"],
            &["get", "append"],
            &["set", "incr"],
        ),
    ];
    for (workload, extra, present, absent) in cases {
        let verify: &[&str] = if *workload == "f" { &[] } else { &["--verify"] };
        let mut args = vec![
            "--server",
            &addr,
            "--workload",
            workload,
            "--requests",
            "3000",
            "--keys",
            "200",
            "--connections",
            "3",
            "--pipeline",
            "4",
            "--load",
        ];
        args.extend_from_slice(extra);
        args.extend_from_slice(verify);
        let out = bench(&args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{workload}: {}",
            text(&out.stderr)
        );
        let r = result_fields(&out);
        assert_eq!(
            (r["ops"].as_str(), r["errors"].as_str()),
            ("3000", "0"),
            "{workload}"
        );
        for op in *present {
            assert!(
                r.contains_key(&format!("{op}_ops")),
                "{workload}: no {op} in {r:?}"
            );
        }
        for op in *absent {
            assert!(
                !r.contains_key(&format!("{op}_ops")),
                "{workload}: unexpected {op}"
            );
        }
        if !verify.is_empty() {
            assert_eq!(r["verify"], "ok", "{workload}");
        }
    }
}

/// Answers GETs with nil; the 10th GET is answered only after `STALL` (a server hiccup).
fn stalling_server() -> SocketAddr {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static GETS: AtomicUsize = AtomicUsize::new(0);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            std::thread::spawn(move || {
                let (mut buf, mut args, mut chunk) = (BytesMut::new(), Vec::new(), [0u8; 4096]);
                loop {
                    let n = match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    let mut out = BytesMut::new();
                    while frame::decode_request(&mut buf, &Limits::DEFAULT, &mut args).unwrap() {
                        if args[0].as_ref() == b"GET" {
                            if GETS.fetch_add(1, Ordering::SeqCst) == 9 {
                                std::thread::sleep(STALL);
                            }
                            frame::put_null(&mut out, frame::Protocol::Resp2);
                        } else {
                            frame::put_error(&mut out, b"ERR unknown command");
                        }
                    }
                    if s.write_all(&out).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

const STALL: std::time::Duration = std::time::Duration::from_millis(400);

#[test]
fn open_loop_charges_a_stall_to_every_request_due_during_it() {
    let addr = stalling_server().to_string();
    // 1000 requests/s on one connection: ~400 requests fall due during the 400 ms stall. Measured
    // from their due time (not from when the stalled connection could send them), they took
    // 400 ms down to ~0 ms, so more than half of the 500 took over 100 ms. A closed-loop client
    // would report one slow request. (Lower bounds only: a slower machine only adds latency.)
    let out = bench(&[
        "--server",
        &addr,
        "--rate",
        "1000",
        "--requests",
        "500",
        "--connections",
        "1",
        "--workload",
        "c",
        "--keys",
        "10",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let r = result_fields(&out);
    assert_eq!(r["ops"], "500");
    let p50: u64 = r["get_p50_us"].parse().unwrap();
    let max: u64 = r["get_max_us"].parse().unwrap();
    assert!(
        p50 >= 100_000,
        "p50 {p50} us: the stall was not charged to the requests due during it"
    );
    assert!(max >= STALL.as_micros() as u64 * 99 / 100, "max {max} us");
}
