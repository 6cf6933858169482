//! `tynamo-bench --local` against the real server: a verified run on a 3-host cluster that is
//! stopped and removed afterwards, a Ctrl-C in the middle of a run, and a server that cannot
//! start.
//!
//! The `tynamo` binary is another package's: it is found next to `tynamo-bench` (a workspace
//! `cargo test` or `cargo build --bins` puts it there) or at `$TYNAMO_BIN`.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;
use common::{result_fields, text};

fn tynamo_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TYNAMO_BIN") {
        return Some(PathBuf::from(p));
    }
    let sibling = PathBuf::from(env!("CARGO_BIN_EXE_tynamo-bench")).with_file_name("tynamo");
    if sibling.exists() {
        return Some(sibling);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "no tynamo binary at {} but CI is set: build it (cargo build --bins) or set TYNAMO_BIN",
        sibling.display()
    );
    eprintln!(
        "skipped: no tynamo binary at {} (cargo build --bins)",
        sibling.display()
    );
    None
}

/// What the bench says about its cluster on stderr: the data directory and host 1's port.
fn cluster_of(stderr: &str) -> (PathBuf, u16) {
    let line = stderr
        .lines()
        .find(|l| l.contains("local cluster: 3 hosts"))
        .unwrap_or_else(|| panic!("no cluster line in:\n{stderr}"));
    let dir = line
        .split("data and logs in ")
        .nth(1)
        .unwrap_or_else(|| panic!("no data dir in {line}"));
    let port = line
        .split("clients on 127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split("..").next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {line}"));
    (PathBuf::from(dir.trim()), port)
}

/// After the bench exited: its data is gone and no host serves any more.
fn assert_cluster_gone(dir: &Path, base: u16) {
    assert!(!dir.exists(), "{} was not removed", dir.display());
    for port in [base, base + 1, base + 10, base + 20, base + 100] {
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "something still listens on {port}"
        );
    }
}

#[test]
fn a_verified_run_on_a_local_cluster_stops_it_and_removes_its_data() {
    let Some(tynamo) = tynamo_binary() else {
        return;
    };
    let out = Command::new(env!("CARGO_BIN_EXE_tynamo-bench"))
        .args([
            "--local",
            "--requests",
            "3000",
            "--connections",
            "8",
            "--pipeline",
            "2",
            "--keys",
            "400",
            "--load",
            "--verify",
            "--workload",
            "a",
        ])
        .env("TYNAMO_BIN", &tynamo)
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let r = result_fields(&out);
    assert_eq!(
        (
            r["ops"].as_str(),
            r["verify"].as_str(),
            r["misses"].as_str()
        ),
        ("3000", "ok", "0"),
        "{r:?}"
    );
    let (gets, sets): (u64, u64) = (r["get_ops"].parse().unwrap(), r["set_ops"].parse().unwrap());
    assert_eq!(gets + sets, 3000);
    assert!(gets > 0 && sets > 0, "a 50/50 mix: {gets} gets {sets} sets");
    assert!(
        !stderr.contains("did not stop"),
        "hosts must stop on SIGTERM: {stderr}"
    );
    let (dir, base) = cluster_of(&stderr);
    assert_cluster_gone(&dir, base);
}

#[test]
fn ctrl_c_during_a_run_stops_the_cluster_and_removes_its_data() {
    let Some(tynamo) = tynamo_binary() else {
        return;
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_tynamo-bench"))
        .args([
            "--local",
            "--duration",
            "10m",
            "--connections",
            "2",
            "--keys",
            "100",
            "--workload",
            "write",
        ])
        .env("TYNAMO_BIN", &tynamo)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines() {
            let line = line.unwrap();
            all.push_str(&line);
            all.push('\n');
            if line.contains("local cluster ready") {
                let _ = tx.send(all.clone());
            }
        }
        all
    });
    let ready = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the local cluster did not become ready");
    let (dir, base) = cluster_of(&ready);
    assert!(dir.exists());
    // SAFETY: SIGINT to our own child, not yet reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the bench ignored SIGINT");
        std::thread::sleep(Duration::from_millis(20));
    };
    let all = reader.join().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{all}");
    assert!(all.contains("stopping the local cluster"), "{all}");
    assert!(
        !all.contains("did not stop"),
        "hosts must stop on SIGTERM: {all}"
    );
    assert_cluster_gone(&dir, base);
}

#[test]
fn a_server_that_cannot_start_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_tynamo-bench"))
        .args(["--local", "--requests", "10"])
        .env("TYNAMO_BIN", "/bin/false")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("--local: host 1 exited (exit status: 1) before the cluster was ready"),
        "{stderr}"
    );
}
